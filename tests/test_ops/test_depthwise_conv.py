"""The depth-wise convolution with shared or per-sample kernels: every path (compiled CPU
kernels, oneDNN's convolution, the fallback) against the unfold reference of
``mmdwnet/testing/reference.py``, which never calls ``F.conv2d``; gradients; and spies that
show which compiled kernels ran."""
import pytest
import torch

from mmdwnet.ops import DepthwiseConv2d, cpu_extension, depthwise_conv2d
from mmdwnet.testing.reference import dwconv as reference


def _compiled_ops_expected(shared, h, w, k, dtype=torch.float32):
    """The compiled ops a forward + backward runs: the kernel gradient always; the forward
    (and the input gradient) where the register-blocked kernel takes K: for per-sample
    float32 or bfloat16 kernels at any size, for shared float32 kernels on maps below 400
    pixels; for per-sample kernels of other kinds on maps below 400 pixels (the generic
    kernel); oneDNN's convolution otherwise."""
    ops = {'depthwise_conv2d_weight_grad'}
    blocked = k in (3, 5, 7, 9)
    small = h * w < 400
    if shared:
        compiled_forward = blocked and dtype == torch.float32 and small
    else:
        compiled_forward = small or (blocked and dtype in (torch.float32, torch.bfloat16))
    if compiled_forward:
        ops.add('depthwise_conv2d')
    return ops


def _inputs(b, c, h, w, k, shared, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(*((c, 1) if shared else (b, c)), k, k, generator=gen, dtype=dtype)
    bias = torch.randn(c, generator=gen, dtype=dtype)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


def test_compiled_kernels_build_here():
    # CI and the project machines have a compiler: the fast path must be the tested one
    assert cpu_extension.load() is not None, cpu_extension.error()


@pytest.mark.parametrize('shared', [True, False])
# (1, 68, ...): more channels than the kernel-gradient's 64-channel blocks
@pytest.mark.parametrize('shape', [(2, 5, 6, 7, 3), (1, 20, 5, 6, 7), (1, 68, 3, 3, 3)])
def test_gradcheck_float64(shared, shape, compiled_ops):
    b, c, h, w, k = shape
    x, weight, bias = _inputs(b, c, h, w, k, shared, torch.float64)
    torch.testing.assert_close(depthwise_conv2d(x, weight, bias), reference(x, weight, bias),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(depthwise_conv2d, (x, weight, bias))
    expected = _compiled_ops_expected(shared, h, w, k, torch.float64)
    assert compiled_ops.ran(torch.float64) == expected


@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('k', [3, 4])  # 4: PyTorch's convolution on every device
def test_output_keeps_the_input_memory_format(shared, k):
    x, weight, bias = _inputs(2, 6, 5, 7, k, shared)
    out = depthwise_conv2d(x, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    x_cf = x.detach().contiguous()
    out_cf = depthwise_conv2d(x_cf, weight, bias)
    assert out_cf.is_contiguous()
    torch.testing.assert_close(out_cf, out)


@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('c,size', [(96, 56), (384, 14), (768, 7)])
def test_float32_stage_shapes_match_the_reference(shared, c, size, compiled_ops):
    """Forward and all gradients at DWNet's stage shapes (K=7)."""
    x, weight, bias = _inputs(2, c, size, size, 7, shared)
    grad = torch.randn(2, c, size, size).contiguous(memory_format=torch.channels_last)
    outs = []
    for fn in (depthwise_conv2d, reference):
        y = fn(x, weight, bias)
        outs.append((y, *torch.autograd.grad(y, (x, weight, bias), grad)))
    for ours, theirs in zip(*outs):
        # kernel gradients sum B*H*W products: float32 rounding differs with the order
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, atol=1e-5 * max(scale, 1.0), rtol=1e-4)
    assert compiled_ops.ran() == _compiled_ops_expected(shared, size, size, 7), \
        compiled_ops.calls


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('k', [3, 5, 7, 9])
@pytest.mark.parametrize('shared', [True, False])
# 37 channels: two whole vectors (16 lanes with AVX-512, 8 with AVX2) and a scalar tail;
# widths 3 (narrower than a block of output pixels), 13 and 19 (partial last blocks)
@pytest.mark.parametrize('c,h,w', [(37, 5, 3), (37, 11, 13), (48, 4, 19)])
def test_register_blocked_kernel(k, shared, c, h, w, dtype):
    """The compiled forward for K = 3, 5, 7, 9 (register-blocked, float32 sums) against the
    float64 reference of the same operands, with and without a bias, at every block-edge
    case of rows, columns and channels; maps smaller than the kernel read zeros outside.
    bfloat16 sums are rounded once: within one bfloat16 unit of the exact sum rounded."""
    ops = cpu_extension.load()
    x, weight, bias = (t.detach().to(dtype) for t in _inputs(2, c, h, w, k, shared))
    taps = weight.reshape(1 if shared else 2, c, k * k).transpose(1, 2).contiguous()
    for b in (bias, None):
        out = ops.depthwise_conv2d(x, taps, b, k)
        expected = reference(x.double(), weight.double(), None if b is None else b.double())
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(out.double(), expected.to(dtype).double(),
                                       rtol=2**-7, atol=1e-5)
    with pytest.raises(RuntimeError, match=r'\(1, K\*K, C\) for kernels shared by the batch'):
        ops.depthwise_conv2d(x, taps[:, :-1], bias, k)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('k', [3, 5, 7, 9])
# whole vectors of channels (the register-blocked kernel: 48 and 32 channels) and a tail
# (37: the scalar kernel); maps narrower and lower than K
@pytest.mark.parametrize('c,h,w', [(48, 4, 19), (32, 9, 3), (37, 11, 13)])
def test_kernel_gradient(k, c, h, w, dtype):
    """The compiled per-sample kernel gradient (B, K*K, C) for K = 3, 5, 7, 9 against the
    float64 gradient of the reference; bfloat16 sums are rounded once."""
    ops = cpu_extension.load()
    x, weight, _ = (t.detach().to(dtype) for t in _inputs(2, c, h, w, k, shared=False))
    grad = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    got = ops.depthwise_conv2d_weight_grad(grad, x, k)
    w64 = weight.double().requires_grad_()
    want, = torch.autograd.grad(reference(x.double(), w64, None), w64, grad.double())
    want = want.reshape(2, c, k * k).transpose(1, 2)  # (B, K*K, C)
    assert got.shape == (2, k * k, c) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=2**-7,
                                   atol=1e-5)


def test_fallback_path_agrees(monkeypatch, compiled_ops):
    """Without the extension (or for inputs it does not take) the same function is
    computed by PyTorch's convolution."""
    x, weight, bias = _inputs(2, 12, 10, 9, 7, shared=False)
    expected = reference(x, weight, bias)
    compiled = depthwise_conv2d(x, weight, bias)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    assert compiled_ops.ran() == {'depthwise_conv2d'}
    compiled_ops.calls.clear()
    monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '0')
    torch.testing.assert_close(depthwise_conv2d(x, weight, bias), expected, atol=1e-5,
                               rtol=1e-5)
    monkeypatch.delenv('MMDWNET_CPU_EXTENSION')
    # NCHW-contiguous input and an even kernel take the PyTorch path
    torch.testing.assert_close(depthwise_conv2d(x.contiguous(), weight, bias), expected,
                               atol=1e-5, rtol=1e-5)
    assert not compiled_ops.calls
    x4, w4, b4 = _inputs(2, 3, 10, 9, 4, shared=True)
    torch.testing.assert_close(depthwise_conv2d(x4, w4, b4), reference(x4, w4, b4),
                               atol=1e-5, rtol=1e-5)
    # even K keeps the size: tap i reads row h + i - K // 2
    x4, w4, _ = _inputs(1, 3, 10, 9, 4, shared=True)
    y = depthwise_conv2d(x4, w4)
    assert y.shape == (1, 3, 10, 9)
    expected = sum(w4[1, 0, i, j] * x4[0, 1, 5 + i - 2, 0 + j - 2]
                   for i in range(4) for j in range(4) if 0 <= 0 + j - 2)
    torch.testing.assert_close(y[0, 1, 5, 0], expected)


def test_module_is_a_conv2d_and_checks_shapes():
    module = DepthwiseConv2d(8, 7)
    plain = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    assert module.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(x), plain(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r'`weight` must be \(C, 1, K, K\) or \(B, C, K, K\)'):
        depthwise_conv2d(x, torch.randn(3, 8, 7, 7))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_runs_the_compiled_kernels_with_float32_sums(dtype, compiled_ops):
    """Per-sample kernels on a small map (the compiled forward) and the kernel gradient of
    both kinds take float16/bfloat16 operands directly and round once."""
    spy = compiled_ops
    for shared in (False, True):
        x, weight, bias = _inputs(2, 24, 9, 9, 7, shared)
        low = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
        y = depthwise_conv2d(*low)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        y.backward(grad)
        # the same rounded operands in float64: sums of float64 products, rounded once
        ref = [t.detach().double().requires_grad_() for t in low]
        expected = reference(*ref)
        expected.backward(grad.double())
        tol = dict(rtol=2**-7, atol=2**-7 * 4) if dtype == torch.bfloat16 else \
            dict(rtol=2**-10, atol=2**-10 * 4)
        torch.testing.assert_close(y.double(), expected, **tol)
        torch.testing.assert_close(low[1].grad.double(), ref[1].grad,
                                   rtol=tol['rtol'], atol=tol['atol'] * 16)
    ran = {name for name, op_dtype in spy.calls if op_dtype == dtype}
    assert ran == {'depthwise_conv2d', 'depthwise_conv2d_weight_grad'}, spy.calls


def test_autocast_casts_every_operand():
    x, weight, bias = _inputs(2, 24, 9, 9, 7, shared=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = depthwise_conv2d(x, weight, bias)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32
