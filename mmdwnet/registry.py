"""Registries of mmdwnet, named as in mmpretrain and mmyolo.

mmdet, mmseg and mmpretrain each build models from their own ``MODELS`` registry, a child of
mmengine's root registry, and fall back to that root for names they do not know (never to
a sibling). A plugin for all three therefore registers in the root: mmdwnet's ``MODELS`` *is*
mmengine's root registry, so ``@MODELS.register_module()`` - the line a contributor copies
from mmyolo - makes ``dict(type='DWNet')`` build under any of the three default scopes.

The scope ``mmdwnet`` has a node below every root registry of mmengine (:data:`SCOPE_NODES`;
``SCOPE_MODELS`` is the one of models), for two reasons:

- ``dict(type='mmdwnet.DWNet')`` resolves;
- mmengine gives every dict of a ``_base_ = 'mmdwnet::...'`` config that names no scope the
  scope ``mmdwnet`` (``_scope_='mmdwnet'``): a visualizer, a hook, a metric or a transform
  of the task library the config is for. A node holds only what mmdwnet registers; a name
  it does not hold is looked up in the registry of the task library whose default scope
  encloses the build (the ``default_scope`` of the running config: ``mmdet``, ``mmseg`` or
  ``mmpretrain``), then in mmengine's root.
"""
from typing import Optional, Type

import mmengine.registry.root as mmengine_root
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope, Registry

SCOPE = 'mmdwnet'


def enclosing_scope() -> Optional[str]:
    """The innermost default scope other than ``mmdwnet``, or None.

    A build of a dict with ``_scope_='mmdwnet'`` runs inside
    ``DefaultScope.overwrite_default_scope('mmdwnet')``, which adds a scope on top of the
    running one and restores the earlier set afterwards; the scope below it is the running
    config's. mmengine has no public accessor for any but the top one.
    """
    for instance in reversed(list(DefaultScope._instance_dict.values())):
        if instance.scope_name != SCOPE:
            return instance.scope_name
    return None


class ScopeNode(Registry):
    """mmdwnet's node of one registry kind: its own names first, then those of the task
    library whose scope encloses the build (:func:`enclosing_scope`), then its parent's."""

    def get(self, key: str) -> Optional[Type]:
        scope, real_key = self.split_scope_key(key)
        if scope is None and real_key not in self._module_dict:
            task = self._task_registry()
            if task is not None:
                obj_cls = task.get(real_key)
                if obj_cls is not None:
                    return obj_cls
        return super().get(key)

    def _task_registry(self) -> Optional[Registry]:
        scope = enclosing_scope()
        if scope is None:
            return None
        root = self._get_root_registry()
        if scope not in root._children:
            try:  # a task library registers its nodes when its registry module is imported
                __import__(f'{scope}.registry')
            except ImportError:
                return None
        task = root._search_child(scope)
        return None if task is None or task is self else task


#: mmdwnet's node below each of mmengine's root registries, by the registry's name.
#: (Each imports ``mmdwnet.models`` when first searched, which registers what mmdwnet has;
#: without a location mmengine would call ``mmdwnet.utils.register_all_modules``.)
SCOPE_NODES = {
    registry.name: ScopeNode(registry.name, parent=registry, scope=SCOPE,
                             locations=['mmdwnet.models'])
    for registry in vars(mmengine_root).values() if isinstance(registry, Registry)
}
MODELS = MMENGINE_MODELS
SCOPE_MODELS = SCOPE_NODES[MMENGINE_MODELS.name]

__all__ = ['MODELS', 'SCOPE_MODELS', 'SCOPE_NODES', 'ScopeNode', 'enclosing_scope']
