"""Registries of mmdwnet, named as in mmpretrain and mmyolo.

mmdet, mmseg and mmpretrain each build models from their own ``MODELS`` registry, a child of
mmengine's root registry, and fall back to that root for names they do not know (never to
a sibling). A plugin for all three therefore registers in the root: mmdwnet's ``MODELS`` *is*
mmengine's root registry, so ``@MODELS.register_module()`` - the line a contributor copies
from mmyolo - makes ``dict(type='DWNet')`` build under any of the three default scopes.
``SCOPE_MODELS`` is mmdwnet's node below the root, which makes the scoped name
``dict(type='mmdwnet.DWNet')`` resolve too.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = MMENGINE_MODELS
SCOPE_MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmdwnet', locations=['mmdwnet.models'])

__all__ = ['MODELS', 'SCOPE_MODELS']
