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


def test_bad_requests_are_refused_and_leave_nothing(tmp_path):
    cfg, ckpt = _checkpoint('mmpretrain/dwconv_t_8xb128_in1k.py', tmp_path / 'cls.pth')
    _, other = _checkpoint('mmpretrain/ddwconv_t_8xb128_in1k.py', tmp_path / 'other.pth')
    out = str(tmp_path / 'never.onnx')
    cases = [
        (dict(fmt='tflite'),
         r"--format 'tflite' is not one of \('onnx', 'exported-program'\)"),
        (dict(fmt='onnx', shape=(0, 64)), r'--shape \(0, 64\) must be two integers H W'),
        (dict(fmt='onnx', shape=(16, 64)), 'each at least 32'),
        (dict(fmt='onnx', checkpoint=other), 'does not fit the model of this config'),
    ]
    for kwargs, message in cases:
        kwargs = dict(dict(checkpoint=ckpt), **kwargs)
        with pytest.raises(ExportError, match=message):
            export_model(cfg, kwargs.pop('checkpoint'), out=out, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ['cls.pth', 'other.pth']


@pytest.mark.slow
def test_tool(tmp_path):
    """The tool: one line for a bad request, and a verified export."""
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')
    _, ckpt = _checkpoint('mmpretrain/dwconv_t_8xb128_in1k.py', tmp_path / 'cls.pth')
    out = tmp_path / 'model.onnx'
    result = run_tool('deployment/export.py', config, ckpt, '--out', str(out), '--format',
                      'tflite', check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: --format 'tflite' is not one of ('onnx', 'exported-program')")
    result = run_tool('deployment/export.py', config, ckpt, '--out', str(out), '--format',
                      'onnx', '--shape', '64', '96', '--verify')
    assert 'folded the backbone' in result.stdout and out.exists()
    assert 'largest difference from PyTorch' in result.stdout


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
