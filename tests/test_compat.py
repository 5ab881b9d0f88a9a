"""The changes mmdwnet makes to other libraries: all of them in mmdwnet/compat.py, each with
its reason and end, each in effect after ``import mmdwnet``."""
import ast
import glob
import os.path as osp

import pytest
import torch
from helpers import ROOT

import mmdwnet  # noqa: F401  (applies the patches, as every config's custom_imports does)
from mmdwnet import compat

FOREIGN = ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'mim', 'numpy')


def test_every_patch_says_what_why_and_when():
    names = [p.name for p in compat.PATCHES]
    assert len(set(names)) == len(names) == 5
    for patch in compat.PATCHES:
        assert patch.changes and len(patch.why) > 40 and patch.remove_when, patch
    # the one applied at interpreter start is applied there
    config_paths, = [p for p in compat.PATCHES if p.apply is None]
    from mmengine.config.utils import MODULE2PACKAGE

    import _mmdwnet_mim
    assert all(f'{module}.' in config_paths.changes for module in _mmdwnet_mim.PATCHES)
    assert MODULE2PACKAGE['mmdwnet'] == 'mmdwnet'


def test_patches_are_in_effect_and_apply_once():
    from mmengine.fileio import get_file_backend
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.optim import AmpOptimWrapper
    from mmengine.runner import CheckpointLoader

    from mmdwnet.utils.checkpoint import AtomicLocalBackend, load_from_local
    init = AmpOptimWrapper.__init__
    compat.apply()  # again: no effect
    assert AmpOptimWrapper.__init__ is init and init._mmdwnet_hint
    assert HistoryBuffer.__getstate__ is compat._history_buffer_state
    assert CheckpointLoader._schemes[''] is load_from_local
    assert isinstance(get_file_backend('/tmp/x.pth'), AtomicLocalBackend)
    assert HistoryBuffer in torch.serialization.get_safe_globals()
    import mmpretrain
    assert 'dwconv_t_8xb128_in1k' in mmpretrain.list_models('dwconv_t*')


def test_amp_on_a_machine_without_cuda_names_the_override():
    """Stock tools building the dense configs' AmpOptimWrapper without CUDA: mmengine's
    assertion, plus the override that trains in float32."""
    from mmengine.optim import AmpOptimWrapper
    if torch.cuda.is_available():
        pytest.skip('the no-CUDA error path')  # CI and the test machines have no GPU
    model = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError, match=r'(?s)only available training on gpu.*'
                       r'--cfg-options optim_wrapper.type=OptimWrapper'):
        AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _patches_in(path):
    """Assignments to attributes of other libraries' objects, and forced registrations,
    in the module at ``path``: (line, source) pairs."""
    tree = ast.parse(open(path).read())
    foreign = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split('.')[0] in FOREIGN:
            foreign.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            foreign.update((a.asname or a.name).split('.')[0] for a in node.names
                           if a.name.split('.')[0] in FOREIGN)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and \
                    base.id in foreign:
                found.append((node.lineno, ast.unparse(target)))
        if isinstance(node, ast.Call) and any(
                k.arg == 'force' and isinstance(k.value, ast.Constant) and k.value.value
                for k in node.keywords):
            found.append((node.lineno, ast.unparse(node.func)))
    return found


def test_no_patch_outside_the_compat_module():
    outside = {}
    for path in glob.glob(osp.join(ROOT, 'mmdwnet', '**', '*.py'), recursive=True):
        rel = osp.relpath(path, ROOT)
        if rel != osp.join('mmdwnet', 'compat.py') and _patches_in(path):
            outside[rel] = _patches_in(path)
    assert not outside, outside
    # the scan sees the patches where they are
    found = {src for _, src in _patches_in(osp.join(ROOT, 'mmdwnet', 'compat.py'))}
    assert {'HistoryBuffer.__getstate__', 'AmpOptimWrapper.__init__',
            'CheckpointLoader.register_scheme', 'register_backend'} <= found, found
