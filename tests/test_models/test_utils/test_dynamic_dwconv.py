"""The dynamic depth-wise convolutions' kernel predictors
(mmdwnet/models/utils/dynamic_dwconv.py)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise_bn_stats
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.models import DWNet
from mmdwnet.models.utils import DynamicDWConv, InhomogeneousDynamicDWConv


def test_homogeneous_dynamic_is_dynamic():
    torch.manual_seed(0)
    conv = DynamicDWConv(16, kernel_size=3).eval()
    randomise_bn_stats(conv)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 16, 6, 5) + torch.randn(2, 16, 1, 1)  # different channel means
    y = conv(x)
    # per-sample kernels predicted from the pooled input, shared by all positions
    kernels = conv.conv2(F.relu(conv.norm(conv.conv1(x.mean((2, 3), keepdim=True)))))
    kernels = kernels.view(2, 16, 1, 3, 3)
    assert (kernels[0] - kernels[1]).abs().max() > 1e-2
    for b in range(2):
        expected = F.conv2d(x[b:b + 1], kernels[b], conv.bias, padding=1, groups=16)
        torch.testing.assert_close(y[b:b + 1], expected)
    # another sample in the batch does not change this sample's output
    x2 = x.clone()
    x2[1] = torch.randn(16, 6, 5)
    torch.testing.assert_close(conv(x2)[0], y[0])
    # the same input under the other sample's kernels gives another output: not static
    swapped = F.conv2d(x[1:2], kernels[0], conv.bias, padding=1, groups=16)
    assert (swapped - y[1:2]).abs().max() > 1e-2


def test_inhomogeneous_dynamic_uses_per_position_kernels():
    torch.manual_seed(0)
    conv = InhomogeneousDynamicDWConv(8, kernel_size=3, group_channels=2).eval()
    randomise_bn_stats(conv)
    x = torch.randn(2, 8, 5, 6)
    weight = conv.conv2(F.relu(conv.norm(conv.conv1(x)))).view(2, 4, 3, 3, 5, 6)
    cols = F.unfold(x, 3, padding=1).view(2, 4, 2, 3, 3, 5, 6)
    expected = (cols * weight.unsqueeze(2)).sum((3, 4)).view(2, 8, 5, 6)
    torch.testing.assert_close(conv(x), expected)
    assert conv.conv1.bias is not None and conv.conv2.out_channels == 4 * 9


@pytest.mark.parametrize('grad', [False, True])
def test_inhomogeneous_dynamic_chunked_equals_whole_batch(monkeypatch, grad):
    """The kernels are predicted and applied (and, backward, predicted again) a few
    samples at a time; the chunks give exactly the whole batch's results."""
    from mmdwnet.ops import predicted_idwconv
    torch.manual_seed(0)
    conv = InhomogeneousDynamicDWConv(8, kernel_size=3, group_channels=2).eval()
    randomise_bn_stats(conv)
    x = torch.randn(5, 8, 6, 7).contiguous(memory_format=torch.channels_last)

    def run():
        inputs = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = conv(inputs)
        if not grad:
            return out, None
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
        return out, inputs.grad

    whole = run()
    per_sample = 4 * 9 * 6 * 7 * 4  # bytes of one sample's kernels
    budget = 2 * per_sample * (2 if grad else 1)  # backward holds kernels and gradients
    monkeypatch.setitem(predicted_idwconv.CHUNK_BYTES, 'cpu', budget)  # chunks 2, 2, 1
    assert predicted_idwconv._chunks(x, 36 * (2 if grad else 1)) == [(0, 2), (2, 4), (4, 5)]
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=0)
    assert chunked[0].is_contiguous(memory_format=torch.channels_last)
    if grad:
        torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)


def test_ddw_batch_of_one_in_training():
    """D-DW's predictor BatchNorm sees one pooled vector per image: a batch of 1 in training
    is a clear error naming the remedies; each remedy works; the predictor norm is
    configurable apart from the block norms."""
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"DynamicDWConv: the kernel predictor normalises one "
                       r"pooled vector per image with BatchNorm2d.*batch of 1.*2 or more "
                       r"images per device.*SyncBN.*norm_eval=True.*predictor_norm_cfg"):
        DWNet('tiny', 'ddw').train()(x)
    gn = DWNet('tiny', 'ddw', predictor_norm_cfg=dict(type='GN', num_groups=1)).train()
    assert gn(x)[0].shape == (1, 768, 2, 2)
    block = gn.stages[0].blocks[0]
    assert isinstance(block.dw_conv.norm, torch.nn.GroupNorm)
    assert isinstance(block.norm1, _BatchNorm) and isinstance(block.norm2, _BatchNorm)
    assert DWNet('tiny', 'ddw', norm_eval=True).train()(x)[0].shape == (1, 768, 2, 2)
    assert DWNet('tiny', 'ddw').train()(torch.randn(2, 3, 64, 64))[0].shape == (2, 768, 2, 2)
    # the default keeps the checkpoints' keys
    assert 'stages.0.blocks.0.dw_conv.norm.running_mean' in DWNet('tiny', 'ddw').state_dict()
