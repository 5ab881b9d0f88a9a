"""DWNet backbones leave PyTorch as standard ONNX (no custom domain, no Unfold/Im2Col), with
dynamic batch, height and width, and ONNX Runtime gives the eager outputs."""
import warnings

import numpy as np
import onnx  # part of the set-up (requirements/deploy.txt)
import onnxruntime as ort
import pytest
import torch

from mmdwnet.models import DWNet
from mmdwnet.ops import export_mode

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], group_channels=[4, 8, 16, 32])


def _export(model, example, path):
    """TorchScript-based ONNX export (seconds; the torch.export-based exporter takes minutes
    on the unrolled K*K shift-and-add graphs) with dynamic batch, height and width."""
    with export_mode(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer and deprecation warnings
        torch.onnx.export(model, (example, ), str(path), input_names=['x'], dynamo=False,
                          dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}},
                          opset_version=17)
    return onnx.load(str(path))


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_backbone_exports_to_standard_onnx(conv_type, tmp_path):
    torch.manual_seed(0)
    model = DWNet(SMALL, conv_type, out_indices=(0, 1, 2, 3), out_norm_cfg=dict(type='BN'))
    model.init_weights()
    model.eval().switch_to_deploy()
    graph = _export(model, torch.randn(2, 3, 64, 64), tmp_path / 'model.onnx')
    ops = {(n.domain or 'ai.onnx', n.op_type) for n in graph.graph.node}
    assert {domain for domain, _ in ops} == {'ai.onnx'}, ops
    assert not {op for _, op in ops} & {'Unfold', 'Im2Col', 'Col2Im'}
    session = ort.InferenceSession(str(tmp_path / 'model.onnx'),
                                   providers=['CPUExecutionProvider'])
    for shape in [(1, 3, 64, 64), (3, 3, 77, 50)]:  # another batch, odd sizes
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        got = session.run(None, {'x': x.numpy()})
        assert len(got) == 4
        for e, g in zip(expected, got):
            assert g.shape == tuple(e.shape)
            scale = e.abs().max().item()
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4 * scale, rtol=0)
