from mmdwnet.utils import format_table, summarize_backbones, summarize_classifiers


def test_demo_summaries_build_through_every_registry():
    messages = []
    rows = summarize_backbones(archs=('tiny', ), conv_types=('iddw', ), input_size=(65, 97),
                               progress=messages.append)
    assert [r['scope'] for r in rows] == ['mmpretrain', 'mmdet', 'mmseg']
    assert {r['params'] for r in rows} == {25_476_624}
    assert all(r['shapes'] == [(96, 17, 25), (192, 9, 13), (384, 5, 7), (768, 3, 4)]
               for r in rows)
    assert messages[0] == 'building the tiny iddw DWNet with mmpretrain.registry.MODELS'
    cls, = summarize_classifiers(archs=('tiny', ), conv_types=('dw', ), input_size=(64, 64))
    assert cls['params'] == 24_172_744 and cls['shapes'] == [(1000, )]
    table = format_table(rows).splitlines()
    assert table[2] == ('| mmpretrain | I-D-DW-T | 25,476,624 | '
                        '96x17x25 192x9x13 384x5x7 768x3x4 |')


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """mmengine's local writes (Runner checkpoints) go through a temporary file and a rename:
    a save killed part way leaves the previous file whole and no partial file; the file is
    what mmengine writes, loadable by torch.load; a damaged file is told from a whole one."""
    import os

    import pytest
    import torch
    from mmengine.fileio import get_file_backend
    from mmengine.runner.checkpoint import save_checkpoint

    from mmdwnet.utils.checkpoint import (AtomicLocalBackend, is_readable_checkpoint,
                                          newest_readable_checkpoint)
    path = tmp_path / 'epoch_1.pth'
    assert isinstance(get_file_backend(str(path)), AtomicLocalBackend)
    save_checkpoint({'meta': {'epoch': 1}, 'state_dict': {'w': torch.ones(3)}}, str(path))
    assert torch.load(path, weights_only=True)['meta'] == {'epoch': 1}
    before = path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # as a kill after writing, before the rename

    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'meta': {'epoch': 2}, 'state_dict': {'w': torch.zeros(3)}}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['epoch_1.pth']
    assert is_readable_checkpoint(str(path))
    (tmp_path / 'epoch_2.pth').write_bytes(before[:len(before) // 2])
    damaged = bytearray(before)
    damaged[before.index(torch.ones(3).numpy().tobytes())] ^= 0xFF  # a weight's byte
    (tmp_path / 'epoch_3.pth').write_bytes(bytes(damaged))
    assert not is_readable_checkpoint(str(tmp_path / 'epoch_2.pth'))
    assert not is_readable_checkpoint(str(tmp_path / 'epoch_3.pth'))
    assert newest_readable_checkpoint(str(tmp_path)) == str(path)


def test_compile_option_is_taken_for_the_backbone():
    """mmengine's `compile` option: True -> torch.compile defaults, a dict -> its arguments,
    False/None -> nothing; anything else is a clear error. tools/train.py compiles the
    backbone in place, so the state-dict keys stay those of the checkpoints."""
    import pytest
    import torch
    from mmengine.config import Config

    from mmdwnet.models import DWNet
    from mmdwnet.utils.launch import LaunchError, compile_backbone, take_compile_option
    assert take_compile_option(Config(dict(compile=True))) == {}
    assert take_compile_option(Config(dict(compile=dict(backend='eager')))) == {
        'backend': 'eager'}
    assert take_compile_option(Config(dict(compile=False))) is None
    cfg = Config(dict(a=1))
    assert take_compile_option(cfg) is None and 'compile' not in cfg
    with pytest.raises(LaunchError, match="compile must be True, False or a dict of "
                       "torch.compile arguments, got 'yes'"):
        take_compile_option(Config(dict(compile='yes')))
    model = torch.nn.Module()
    small = dict(embed_dims=16, depths=[1, 1, 1, 1], group_channels=[4, 8, 16, 32])
    model.backbone = DWNet(small)
    keys = list(model.state_dict())
    compile_backbone(model, dict(backend='eager'))
    assert list(model.state_dict()) == keys
    assert model.backbone._compiled_call_impl is not None


def test_every_forward_idwconv_operator_has_a_flop_rule():
    """The FLOP counter knows every I-D-DW forward operator mmdwnet registers, the CUDA
    (Triton) ones included, so that a model counts the same on any device; backward
    operators need no rule."""
    import torch

    import mmdwnet.ops  # noqa: F401  registers the operators
    from mmdwnet.utils.complexity import OP_HANDLES
    names = {f'mmdwnet::{name}' for name in dir(torch.ops.mmdwnet)
             if 'dwconv2d' in name and 'grad' not in name and 'backward' not in name}
    expected = {'mmdwnet::inhomogeneous_dwconv2d', 'mmdwnet::predicted_idwconv2d'}
    from mmdwnet.ops import triton_idwconv
    if triton_idwconv.triton is not None:
        expected |= {'mmdwnet::inhomogeneous_dwconv2d_triton',
                     'mmdwnet::predicted_idwconv2d_triton'}
    assert names == expected and names <= set(OP_HANDLES), (names, sorted(OP_HANDLES))
