"""Registries of mmdwnet.

mmdet, mmseg and mmpretrain each build models from their own ``MODELS`` registry, a child of
mmengine's root registry, and fall back to that root for names they do not know. mmdwnet
therefore registers its models once, in the root (``ROOT_MODELS``), which makes
``dict(type='DWNet')`` build under any of the three default scopes without importing them.
``MODELS`` is mmdwnet's own scope node: ``dict(type='mmdwnet.DWNet')`` resolves through it.
"""
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=ROOT_MODELS, scope='mmdwnet', locations=['mmdwnet.models'])

__all__ = ['MODELS', 'ROOT_MODELS']
