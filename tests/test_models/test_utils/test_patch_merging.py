"""Channels-last patch merging (mmdwnet/models/utils/patch_merging.py)."""
import math

import pytest
import torch


@pytest.mark.parametrize('size', [(6, 8), (5, 7)])
def test_channels_last_patch_merging_equals_mmcv(size, monkeypatch):
    from mmcv.cnn.bricks.transformer import PatchMerging

    from mmdwnet.models.utils import ChannelsLastPatchMerging
    torch.manual_seed(0)
    ours = ChannelsLastPatchMerging(8, 16)
    theirs = PatchMerging(8, 16, norm_cfg=dict(type='LN'))
    theirs.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(2, size[0] * size[1], 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ya, hwa), (yb, hwb) = ours(xa, size), theirs(xb, size)
    assert hwa == hwb == (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    torch.testing.assert_close(ya, yb)
    # in inference on CPU the reduction is oneDNN's linear layer, with the same output
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise',
                        lambda *args: calls.append(args[3]) or onednn(*args), raising=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, size)[0], yb, rtol=1e-5, atol=1e-5)
    assert calls == ['none']
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    # the parameters are indexed to the gathering order: their gradients stay in mmcv's
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_params[name].grad)
    with pytest.raises(ValueError, match=r'input of length 48 does not match input_size '
                       r'\(5, 7\)'):
        ours(torch.randn(1, 48, 8), (5, 7))
    with pytest.raises(ValueError, match=r"`norm_cfg` must build a LayerNorm \(or be None\), "
                       r"got \{'type': 'BN1d'\}"):
        ChannelsLastPatchMerging(8, 16, norm_cfg=dict(type='BN1d'))
    without_norm = ChannelsLastPatchMerging(8, 16, norm_cfg=None)
    bare = PatchMerging(8, 16, norm_cfg=None)
    bare.load_state_dict(without_norm.state_dict())
    torch.testing.assert_close(without_norm(x, size)[0], bare(x, size)[0])
