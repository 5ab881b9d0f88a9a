"""DWNet's block (mmdwnet/models/backbones/dwnet_block.py): its layout, its deploy
form and which kernels it runs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise_bn_stats
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.models import DWNet


def _reference_stage1_block(block, x):
    """The DWNet block as the authors' code defines it, written out with functional calls
    (eval mode)."""

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0., m.eps)

    y = F.relu(bn(block.norm1, F.conv2d(x, block.pw_conv1.weight)))
    y = F.conv2d(y, block.dw_conv.weight, block.dw_conv.bias, padding=3, groups=y.shape[1])
    y = F.relu(bn(block.norm2, y))
    y = bn(block.norm3, F.conv2d(y, block.pw_conv2.weight))
    x = x + y
    t = bn(block.ffn_norm, x).permute(0, 2, 3, 1)
    fc1, fc2 = block.ffn.layers[0][0], block.ffn.layers[1]
    t = F.linear(F.gelu(F.linear(t, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    return x + t.permute(0, 3, 1, 2)


def test_block_matches_spec():
    model = DWNet('tiny', 'dw').eval()
    randomise_bn_stats(model)
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 96, 9, 11)
    torch.testing.assert_close(block(x), _reference_stage1_block(block, x))


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_bf16_block_agrees_with_fp32(conv_type):
    """One block in deploy form (BatchNorms folded, statistics from natural images) under
    bfloat16 autocast: every operator and the folded layers in bfloat16, within a few
    bfloat16 roundings of float32."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.testing import natural_images
    torch.manual_seed(0)
    stem = DWNet('tiny', conv_type).patch_embed
    with torch.no_grad():
        x, (h, w) = stem(natural_images(4, 112))
        x = x.transpose(1, 2).reshape(4, -1, h, w).contiguous(memory_format=torch.channels_last)
    block = DWBlock(96, conv_type, group_channels=3)
    with torch.no_grad():  # BatchNorm statistics of these features, then fold
        for m in block.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = None
        block.train()(x)
    block.eval().switch_to_deploy()
    # every BatchNorm folded; the one after I-D-DW (group-shared kernels cannot take it)
    # into the operator, which applies it to its sums
    left = [m for m in block.modules() if isinstance(m, _BatchNorm)]
    assert left == []
    assert (getattr(block.dw_conv, 'out_scale', None) is not None) == (conv_type == 'iddw')
    with torch.no_grad():
        reference = block(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = block(x)
    # the residual stream keeps the input's float32; every branch ran in bfloat16
    assert low.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(low, reference)
    error = ((low.float() - reference).abs().max() / reference.abs().max()).item()
    assert error < 2**-6, error  # measured about 2**-7 for each operator


@pytest.mark.parametrize('conv_type', ['dw', 'iddw'])
def test_deploy_fuses_layers(monkeypatch, conv_type):
    """switch_to_deploy turns the first 1x1 conv + ReLU into one Conv2dReLU, the last 1x1
    conv + residual addition into one Conv2dAdd, the FFN's first Linear + GELU into one
    LinearGELU and its second Linear + residual addition into one LinearAdd, and the I-D-DW
    kernel predictor's first 1x1 conv + ReLU into one Conv2dReLU (same keys); without
    autograd on CPU in eval mode they run oneDNN's fused kernels, with autograd
    the separate layers, in training mode no fused additions, under bfloat16 autocast
    the products with their ReLU or GELU and no fused additions, all equal to the unfused
    block."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.models.utils import Conv2dAdd, Conv2dReLU, LinearAdd, LinearGELU
    torch.manual_seed(0)
    block = DWBlock(16, conv_type, kernel_size=3, group_channels=4).eval()
    randomise_bn_stats(block)
    keys = set(block.state_dict())
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
    block.switch_to_deploy()
    assert type(block.pw_conv1) is Conv2dReLU and type(block.pw_conv2) is Conv2dAdd
    assert type(block.ffn.layers[0][0]) is LinearGELU
    assert isinstance(block.ffn.layers[0][1], torch.nn.Identity)
    assert type(block.ffn.layers[1]) is LinearAdd
    iddw = conv_type == 'iddw'
    if iddw:
        assert type(block.dw_conv.conv1) is Conv2dReLU
        assert {'dw_conv.conv1.weight', 'dw_conv.conv1.bias'} <= set(block.state_dict())
    predictor = ['relu'] if iddw else []  # the I-D-DW predictor's conv + ReLU
    # the fused layers' keys are those of the layers they replace (biases from the folds)
    fused_keys = ('pw_conv', 'ffn.layers')
    assert {k for k in block.state_dict() if k.startswith(fused_keys)} == \
        {k for k in keys if k.startswith(fused_keys)} | {'pw_conv1.bias', 'pw_conv2.bias'}
    calls = []

    def spy(name, attr_index):  # records the pointwise operations of a fused kernel
        fused = getattr(torch.ops.mkldnn, name)

        class Spy:

            def __call__(self, *args):
                calls.append(args[attr_index])
                return fused(*args)

            def binary(self, *args):
                calls.append(args[attr_index + 1])
                return fused.binary(*args)

        monkeypatch.setattr(torch.ops.mkldnn, name, Spy(), raising=False)

    spy('_linear_pointwise', 3)
    spy('_convolution_pointwise', 7)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert calls == ['relu', *predictor, 'add', 'gelu', 'add']
    with torch.enable_grad():
        out = block(x.requires_grad_())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    n = len(calls)
    assert n == 4 + iddw  # autograd took the separate layers
    block.train()
    for m in block.modules():  # I-D-DW's norm2 stays: its running statistics
        if isinstance(m, _BatchNorm):
            m.eval()
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls[n:] == ['relu', *predictor, 'gelu']  # training: no fused additions
    block.eval()
    n = len(calls)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        low = block(x)
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
    # bfloat16: the additions unfused, the second layer oneDNN's plain linear layer; the
    # standard layers where this CPU has no oneDNN kernels for bfloat16 (AVX2 only)
    from mmdwnet.ops.dispatch import onednn_dtypes
    assert calls[n:] == (['relu', *predictor, 'gelu', 'none']
                         if torch.bfloat16 in onednn_dtypes() else [])


def test_iddw_norm_and_relu_run_in_the_kernel(monkeypatch):
    """The I-D-DW block's norm2 (a BatchNorm, which cannot fold into kernels that the
    channels of a group share) and its ReLU: switch_to_deploy hands them to the operator,
    whose fused CPU kernel applies them in inference (neither the norm nor the registered
    operator is called); before it, and with autograd, the separate layers; the same
    outputs."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.ops import predicted_idwconv as op_module
    torch.manual_seed(0)
    block = DWBlock(16, 'iddw', kernel_size=3, group_channels=4).eval()
    randomise_bn_stats(block)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = block(x.clone().requires_grad_()).detach()  # autograd: the separate layers
    norm_calls, op_calls, forward = [], [], op_module._forward
    block.norm2.register_forward_hook(lambda *args: norm_calls.append(1))
    monkeypatch.setattr(op_module, '_forward', lambda *a: op_calls.append(1) or forward(*a))
    with torch.no_grad():  # before deploy: the registered operator, then the norm
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert norm_calls == [1] and op_calls == [1]
    block.switch_to_deploy()
    with torch.no_grad():  # deploy form: the fused kernel applies the norm and ReLU
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert norm_calls == [1] and op_calls == [1]
    # with autograd, the registered operator and the map after it: the same outputs
    out = block(x.clone().requires_grad_())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert op_calls == [1, 1]


@pytest.mark.parametrize('change', [None, 'ffn_drop', 'tanh_gelu', 'eval_no_grad'])
def test_block_ffn_trains_through_gelu_mlp(change, compiled_ops):
    """In training the FFN's linear-GELU-linear runs as one gelu_mlp (the compiled
    GELU-with-derivative pass) and computes mmcv's FFN(x, identity): outputs and gradients
    against the FFN itself in float64. With an active dropout between the layers, another
    GELU, or without autograd, the FFN's own layers run."""
    torch.manual_seed(0)
    block = DWNet('tiny', 'dw', drop_path_rate=0.).stages[0].blocks[0].train()
    if change == 'ffn_drop':
        block.ffn.layers[0][2].p = 0.1
    if change == 'tanh_gelu':
        block.ffn.layers[0][1].approximate = 'tanh'
    x, identity = torch.randn(2, 5, 7, 96), torch.randn(2, 5, 7, 96)
    reference = copy.deepcopy(block).double()
    xd, idd = x.double().requires_grad_(), identity.double().requires_grad_()
    torch.manual_seed(1)
    expected = reference.ffn(xd, idd)
    if change == 'eval_no_grad':
        block.eval()
        with torch.no_grad():
            out = block.ffn(x, identity)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert compiled_ops.ran() == set()
        return
    x.requires_grad_(), identity.requires_grad_()
    torch.manual_seed(1)
    out = block.ffn(x, identity)
    assert compiled_ops.ran() == ({'gelu_with_derivative_'} if change is None else set())
    if change == 'ffn_drop':  # dropped hidden values: the outputs differ from the FFN's
        assert not torch.allclose(out.double(), reference.ffn.eval()(xd, idd), atol=1e-3)
        return
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(identity.grad.double(), idd.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(block.ffn.named_parameters(), reference.ffn.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-4, msg=name)
