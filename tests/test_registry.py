"""mmdwnet's registry nodes: the scoped names, and names of the task library whose default
scope encloses a build under the scope ``mmdwnet``."""
import pytest
from mmengine.registry import HOOKS, MODELS, TRANSFORMS, VISUALIZERS, DefaultScope

from mmdwnet.models import DWNet
from mmdwnet.registry import SCOPE_MODELS, SCOPE_NODES, ScopeNode, enclosing_scope


def test_a_node_below_every_root_registry():
    import mmengine.registry.root as root
    from mmengine.registry import Registry
    kinds = {r.name for r in vars(root).values() if isinstance(r, Registry)}
    assert set(SCOPE_NODES) == kinds and len(kinds) >= 20
    for node in SCOPE_NODES.values():
        assert isinstance(node, ScopeNode) and node.scope == 'mmdwnet'
        assert node.parent._children['mmdwnet'] is node
    assert SCOPE_MODELS is MODELS._children['mmdwnet']


def test_own_names_and_scoped_names():
    assert MODELS.get('mmdwnet.DWNet') is DWNet
    assert SCOPE_MODELS.get('DWNet') is DWNet  # registered in the root, found through it
    with MODELS.switch_scope_and_registry('mmdwnet') as registry:
        assert registry is SCOPE_MODELS


@pytest.mark.parametrize('task,registry,name,module', [
    ('mmpretrain', VISUALIZERS, 'UniversalVisualizer', 'mmpretrain.visualization'),
    ('mmdet', VISUALIZERS, 'DetLocalVisualizer', 'mmdet.visualization'),
    ('mmseg', HOOKS, 'SegVisualizationHook', 'mmseg.engine'),
    ('mmdet', TRANSFORMS, 'PackDetInputs', 'mmdet.datasets'),
    ('mmseg', TRANSFORMS, 'PackSegInputs', 'mmseg.datasets'),
])
def test_names_of_the_enclosing_task(task, registry, name, module):
    """Under the scope ``mmdwnet`` (what mmengine gives the dicts of an ``mmdwnet::`` base)
    a name of the task library of the running config resolves to that library's class."""
    assert enclosing_scope() is None
    with registry.switch_scope_and_registry('mmdwnet') as node:
        assert node.get(name) is None  # no task: mmdwnet's own and mmengine's names only
    DefaultScope.get_instance(f'test-{task}', scope_name=task)
    with registry.switch_scope_and_registry('mmdwnet') as node:
        assert node is registry._children['mmdwnet']
        assert enclosing_scope() == task
        found = node.get(name)
    assert found is not None and found.__module__.startswith(module), found
    with registry.switch_scope_and_registry(task) as own:
        assert own.get(name) is found
    # mmengine's own names come from its root whatever the task
    with VISUALIZERS.switch_scope_and_registry('mmdwnet') as node:
        assert node.get('Visualizer').__module__.startswith('mmengine')


def test_a_scoped_name_of_another_library_is_not_redirected():
    DefaultScope.get_instance('test-mmdet', scope_name='mmdet')
    with TRANSFORMS.switch_scope_and_registry('mmdwnet') as node:
        found = node.get('mmseg.PackSegInputs')
    assert found.__module__.startswith('mmseg')
