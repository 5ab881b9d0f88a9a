"""tools/model_converters/resize_kernels.py: 7x7 -> 12x12 kernels for every operator,
loading strictly into a kernel_size=12 model."""

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tool

from mmdwnet.converters.resize_kernels import resize_kernels
from mmdwnet.models import DWNet

TOOL = 'model_converters/resize_kernels.py'
ARCH = dict(embed_dims=16, depths=[1, 1, 1, 1], group_channels=[4, 8, 16, 32])


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_resized_state_loads_and_interpolates(conv_type):
    model = DWNet(ARCH, conv_type, extra_dw=conv_type == 'iddw')
    state = model.state_dict()
    resized, changed = resize_kernels(state, 7, 12)
    target = DWNet(ARCH, conv_type, kernel_size=12, extra_dw=conv_type == 'iddw')
    target.load_state_dict(resized, strict=True)
    expected_changed = {'dw': 4, 'ddw': 8, 'iddw': 12}[conv_type]  # per block: 1 / 2 / 2+1
    assert len(changed) == expected_changed
    key = 'stages.1.blocks.0.dw_conv.' + ('weight' if conv_type == 'dw' else 'conv2.weight')
    if conv_type == 'dw':
        torch.testing.assert_close(
            resized[key], F.interpolate(state[key], size=(12, 12), mode='bicubic',
                                        align_corners=False))
    else:
        # the predictor's output channel n*K*K + i*K + j is tap (i, j) of kernel n
        n, r = state[key].shape[0] // 49, state[key].shape[1]
        maps = state[key].reshape(n, 7, 7, r)[..., 0]
        expected = F.interpolate(maps[:, None], size=(12, 12), mode='bicubic',
                                 align_corners=False)[:, 0]
        torch.testing.assert_close(resized[key].reshape(n, 12, 12, r)[..., 0], expected)
    # same size: nothing changes; the model still runs with even kernels
    same, _ = resize_kernels(state, 7, 7)
    assert all(torch.allclose(same[k], state[k], atol=1e-6) for k in state)
    assert target.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 128, 2, 2)


@pytest.mark.slow
def test_tool(tmp_path):
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in
                               DWNet(ARCH, 'dw').state_dict().items()}, 'meta': {}},
               tmp_path / 'src.pth')
    out = run_tool(TOOL, str(tmp_path / 'src.pth'), str(tmp_path / 'dst.pth'),
                   '--kernel-size', '12')
    assert 'resized 4 kernel tensors 7x7 -> 12x12' in out.stdout
    saved = torch.load(tmp_path / 'dst.pth', weights_only=True)
    assert saved['state_dict']['backbone.stages.0.blocks.0.dw_conv.weight'].shape == \
        (16, 1, 12, 12)
    assert saved['meta']['kernel_size'] == 12
    bad = run_tool(TOOL, str(tmp_path / 'src.pth'), str(tmp_path / 'x.pth'), '--kernel-size',
                   '12', '--from-size', '5', check=False)
    assert bad.returncode == 1 and 'no 5x5 depth-wise kernels' in bad.stderr
    assert not (tmp_path / 'x.pth').exists()
