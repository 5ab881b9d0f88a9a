"""tools/deployment/export.py and mmdwnet.apis.export: whole configs out of PyTorch, verified
against eager PyTorch; bad requests get one clear line and leave no file behind."""
import os.path as osp

import pytest
import torch
from helpers import ROOT, run_tool
from mmengine.config import Config

from mmdwnet.apis.export import ExportError, export_model
from mmdwnet.utils import build_model


def _checkpoint(config, path, seed=0):
    """Random weights of ``config``'s model (BatchNorm statistics too), saved as a Runner
    checkpoint."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return cfg, str(path)


@pytest.mark.parametrize('fmt', ['onnx', 'exported-program'])
def test_classifier_exports_and_verifies(fmt, tmp_path):
    cfg, ckpt = _checkpoint('mmpretrain/iddwconv_t_8xb128_in1k.py', tmp_path / 'cls.pth')
    out = tmp_path / f'model.{fmt}'
    lines = []
    result = export_model(cfg, ckpt, fmt, str(out), shape=(64, 64), dynamic=True,
                          verify=True, progress=lines.append)
    assert out.exists() and result['task'] == 'mmpretrain'
    assert result['max_rel_diff'] < 1e-4
    assert any('folded the backbone' in line for line in lines)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.export-')] == []


@pytest.mark.slow
def test_tool_refuses_bad_requests_and_leaves_nothing(tmp_path):
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')
    _, ckpt = _checkpoint('mmpretrain/dwconv_t_8xb128_in1k.py', tmp_path / 'cls.pth')
    _, other = _checkpoint('mmpretrain/ddwconv_t_8xb128_in1k.py', tmp_path / 'other.pth')
    out = tmp_path / 'never.onnx'
    cases = [
        (['--format', 'tflite'], "--format 'tflite' is not one of ('onnx', 'exported-program')"),
        (['--format', 'onnx', '--shape', '0', '64'], '--shape (0, 64) must be two integers'),
        (['--format', 'onnx', '--shape', '16', '64'], 'each at least 32'),
    ]
    for args, message in cases:
        result = run_tool('deployment/export.py', config, ckpt, '--out', str(out), *args,
                          check=False)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
            'error: ') and message in result.stderr, result.stderr[-2000:]
    result = run_tool('deployment/export.py', config, other, '--out', str(out), '--format',
                      'onnx', check=False)
    assert result.returncode == 1 and 'does not fit the model of this config' in result.stderr
    assert not out.exists() and list(tmp_path.glob('.export-*')) == []
    # and a good request, through the tool
    result = run_tool('deployment/export.py', config, ckpt, '--out', str(out), '--format',
                      'onnx', '--shape', '64', '96', '--verify')
    assert 'largest difference from PyTorch' in result.stdout and out.exists()


def test_missing_onnxruntime_is_named(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == 'onnxruntime':
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_onnxruntime)
    with pytest.raises(ExportError, match='--verify needs onnxruntime'):
        export_model(Config(dict(default_scope='mmpretrain')), 'x.pth', 'onnx',
                     str(tmp_path / 'm.onnx'), verify=True)
    assert not (tmp_path / 'm.onnx').exists()
