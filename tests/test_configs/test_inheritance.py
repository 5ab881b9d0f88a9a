"""`_base_ = 'mmdwnet::...'` from a project outside the repository: in a fresh interpreter
with the editable install of this checkout (the wheel and the sdist: test_packaging.py), and
the scope mmengine gives the dicts of such a base."""
import glob
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # tools in subprocesses

DOWNSTREAM = textwrap.dedent('''
    _base_ = 'mmdwnet::mmdet/cascade_dwconv_t_3x.py'
    model = dict(backbone=dict(conv_type='iddw'))
    train_cfg = dict(max_epochs=12)
''')
CHECK = textwrap.dedent('''
    from mmengine.config import Config
    cfg = Config.fromfile('downstream.py')
    import mmdwnet
    print(cfg.model.backbone.type, cfg.model.backbone.conv_type, cfg.model.backbone.arch,
          cfg.train_cfg.max_epochs, cfg.default_scope, cfg.model.type, mmdwnet.__file__)
''')


def test_editable_install(tmp_path):
    (tmp_path / 'downstream.py').write_text(DOWNSTREAM)
    out = subprocess.run([sys.executable, '-c', CHECK], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:6] == ['DWNet', 'iddw', 'tiny', '12', 'mmdet', 'CascadeRCNN']
    assert out[6] == osp.join(ROOT, 'mmdwnet', '__init__.py')


# Where the Runner builds a dict of a config from: its registry, by the key that holds it
# (the nearest such key on its path wins; top-level keys are only matched at the top).
_NESTED_REGISTRIES = {'vis_backends': 'VISBACKENDS', 'pipeline': 'TRANSFORMS',
                      'transforms': 'TRANSFORMS', 'dataset': 'DATASETS',
                      'sampler': 'DATA_SAMPLERS', 'batch_sampler': 'DATA_SAMPLERS',
                      'collate_fn': 'FUNCTIONS', 'optimizer': 'OPTIMIZERS'}
_TOP_REGISTRIES = {'visualizer': 'VISUALIZERS', 'default_hooks': 'HOOKS',
                   'custom_hooks': 'HOOKS', 'val_evaluator': 'METRICS',
                   'test_evaluator': 'METRICS', 'optim_wrapper': 'OPTIM_WRAPPERS',
                   'param_scheduler': 'PARAM_SCHEDULERS', 'model': 'MODELS',
                   'log_processor': 'LOG_PROCESSORS', 'train_cfg': 'LOOPS', 'val_cfg': 'LOOPS',
                   'test_cfg': 'LOOPS', 'model_wrapper_cfg': 'MODEL_WRAPPERS',
                   'train_dataloader': 'DATASETS', 'val_dataloader': 'DATASETS',
                   'test_dataloader': 'DATASETS', 'data_preprocessor': 'MODELS'}


def _registry_of(path):
    """The registry name for the dict at ``path``, or None for a helper variable of the
    config (``norm_cfg``, ``train_pipeline``): the Runner builds only what its arguments
    hold, and copies of those variables inside them are checked there."""
    import inspect

    from mmengine.runner import Runner
    if path[0] not in inspect.signature(Runner.__init__).parameters:
        return None
    for key in reversed(path[1:]):
        if isinstance(key, str) and key in _NESTED_REGISTRIES:
            return _NESTED_REGISTRIES[key]
    if path[0] in _TOP_REGISTRIES:
        return _TOP_REGISTRIES[path[0]]
    raise AssertionError(f'no registry known for {".".join(map(str, path))}: add it above')


def _typed_dicts(node, path=(), scope=None):
    """(path, type, scope) of every dict with a ``type`` in ``node``, the scope being the one
    it is built under: its own ``_scope_``, else that of the dict it is built inside."""
    if isinstance(node, dict):
        scope = node.get('_scope_', scope)
        if isinstance(node.get('type'), str):
            yield path, node['type'], scope
        for key, value in node.items():
            yield from _typed_dicts(value, path + (key, ), scope)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _typed_dicts(value, path + (i, ), scope)


SHIPPED_CONFIGS = sorted(
    osp.relpath(p, osp.join(ROOT, 'configs'))
    for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True))


def test_every_dict_of_every_shipped_config_resolves_under_its_mmdwnet_scope(tmp_path):
    """mmengine gives each dict of a ``_base_ = 'mmdwnet::...'`` config that names no scope
    the scope ``mmdwnet``. Every such dict of every config we ship (and every dict built
    inside one) resolves, in the registry the Runner builds it from, to the class the
    config's own default scope gives that name, with no fallback warning."""
    import mmengine.logging
    import mmengine.registry as registries
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    warnings = []
    real_print_log = mmengine.logging.print_log

    def print_log(msg, *args, **kwargs):
        warnings.append(msg)
        return real_print_log(msg, *args, **kwargs)

    checked = set()
    mmengine.logging.print_log = print_log
    try:
        for rel in SHIPPED_CONFIGS:
            (tmp_path / 'downstream.py').write_text(f"_base_ = 'mmdwnet::{rel}'\n")
            cfg = Config.fromfile(str(tmp_path / 'downstream.py'))
            task = cfg.default_scope
            DefaultScope.get_instance(f'check-{rel}', scope_name=task)
            for path, name, scope in _typed_dicts(cfg.to_dict()):
                kind = _registry_of(path)
                if scope != 'mmdwnet' or kind is None:
                    continue
                registry = getattr(registries, kind)
                with registry.switch_scope_and_registry(task) as own:
                    expected = own.get(name)
                assert expected is not None, (rel, path, name)
                warnings.clear()
                with registry.switch_scope_and_registry('mmdwnet') as node:
                    found = node.get(name)
                assert found is expected, (rel, path, name, found, expected)
                assert not [w for w in warnings if 'Failed to' in w], (rel, path, warnings)
                checked.add((rel.split('/')[0], kind, name))
    finally:
        mmengine.logging.print_log = real_print_log
    print(sorted(checked))
    # what the configs hold under the scope: the visualizers, their backends, the AMP
    # optimizer wrapper with its optimizer, among them
    assert ('mmpretrain', 'VISUALIZERS', 'UniversalVisualizer') in checked
    assert ('mmpretrain', 'VISBACKENDS', 'LocalVisBackend') in checked
    assert ('mmdet', 'OPTIM_WRAPPERS', 'AmpOptimWrapper') in checked
