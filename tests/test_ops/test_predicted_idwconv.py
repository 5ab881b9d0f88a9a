"""mmdwnet.ops.predicted_idwconv2d: I-D-DW with its kernels predicted by a 1x1 convolution
inside the operator, never stored for the backward pass."""
import pytest
import torch

from mmdwnet.ops import cpu_extension
from mmdwnet.ops import predicted_idwconv as module
from mmdwnet.ops import predicted_idwconv2d
from mmdwnet.testing.reference import idwconv as reference_idwconv
from mmdwnet.testing.reference import predicted_idwconv as unfold_reference


def _operands(b=3, c=8, r=2, g=4, k=3, h=5, w=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=gen, dtype=dtype),
            torch.randn(b, r, h, w, generator=gen, dtype=dtype),
            torch.randn(g * k * k, r, generator=gen, dtype=dtype),
            torch.randn(g * k * k, generator=gen, dtype=dtype))


def _fused_kernel():
    ops = cpu_extension.load()
    assert ops is not None, cpu_extension.error()
    return ops


# K = 3 runs the fused CPU kernel forward; K = 9 has none and predicts the kernels a
# chunk at a time, as the backward pass always does
@pytest.mark.parametrize('k', [3, 9])
@pytest.mark.parametrize('chunk_samples,tile', [(None, 512), (1, 512), (2, 7)])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
def test_matches_unfold_reference_and_gradcheck(chunk_samples, tile, layout, k, monkeypatch):
    x, hidden, weight, bias = _operands(k=k)
    if layout == 'channels_last':
        x, hidden = (t.contiguous(memory_format=torch.channels_last) for t in (x, hidden))
    x, hidden, weight, bias = (t.requires_grad_() for t in (x, hidden, weight, bias))
    assert _fused_kernel().predicted_idwconv2d_applies(k, x.dtype, True) == (k == 3)
    if chunk_samples:  # the batch splits into chunks
        monkeypatch.setitem(module.CHUNK_BYTES, 'cpu', 2 * chunk_samples * 4 * k * k * 30 * 8)
    monkeypatch.setattr(module, '_TILE', tile)  # 7: backward products in 5 position tiles
    out = predicted_idwconv2d(x, hidden, weight, bias, k)
    torch.testing.assert_close(out, unfold_reference(x, hidden, weight, bias, k),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: predicted_idwconv2d(*t, k), (x, hidden, weight, bias))


# (b, c, r, g, k, h, w) for the fused CPU kernel: K = 3, 5, 7, 12 (one or two vectors of
# positions per register tile); an odd R (a bfloat16 pair of rows with a zero partner);
# rows of one partial vector, of whole two-vector tiles plus one vector, and maps lower
# than K (every output row skips kernel rows whose source rows lie outside); 3 samples of
# 3 groups: with 2 threads each takes part of the middle sample, whose channels-last
# output each transposes back for its own groups only
FUSED_SHAPES = [(2, 96, 24, 32, 7, 13, 21), (1, 12, 5, 4, 5, 9, 20), (2, 8, 3, 2, 3, 7, 7),
                (1, 16, 6, 4, 12, 15, 17), (1, 64, 16, 32, 7, 5, 32), (3, 9, 4, 3, 3, 6, 10),
                (1, 24, 200, 8, 7, 40, 14)]
# the forward pass's tiles of 3 vectors span output rows where a row is not a multiple of
# 3 vectors, in blocks of rows sized by R: the last shape has rows of 2 (4 in float64)
# vectors and 14 blocks of 3 rows, the last one short


@pytest.mark.parametrize('shape', FUSED_SHAPES)
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'strided'])
def test_fused_kernel_matches_unfold_reference(shape, layout):
    b, c, r, g, k, h, w = shape
    x, hidden, weight, bias = _operands(b, c, r, g, k, h, w)
    if layout == 'channels_last':
        x, hidden = (t.contiguous(memory_format=torch.channels_last) for t in (x, hidden))
    elif layout == 'strided':  # neither NCHW nor channels-last; `hidden` a channel slice
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        hidden = torch.cat([hidden, hidden[:, :2]], 1)[:, :r]
    expected = unfold_reference(x, hidden, weight, bias, k)
    out = _fused_kernel().predicted_idwconv2d(x, hidden, weight, bias, k)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last
                             if layout == 'channels_last' else torch.contiguous_format)


@pytest.mark.parametrize('shape', FUSED_SHAPES[:4] + FUSED_SHAPES[-1:])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2**-20), (torch.bfloat16, 2**-7),
                                       (torch.float16, 2**-10)])
def test_fused_kernel_in_low_precision(shape, dtype, tol):
    """Sums in float32, the kernel values too; the output rounded once: within a rounding
    of the dtype (relative to the largest output) of the same operands in float64."""
    b, c, r, g, k, h, w = shape
    operands = [t.to(dtype) for t in _operands(b, c, r, g, k, h, w)]
    operands[2] = operands[2] * 0.25  # kernel values of the size DWNet predicts
    expected = unfold_reference(*(t.double() for t in operands), k)
    for layout in (torch.contiguous_format, torch.channels_last):
        x, hidden = (t.contiguous(memory_format=layout) for t in operands[:2])
        out = _fused_kernel().predicted_idwconv2d(x, hidden, *operands[2:], k)
        assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
        error = (out.double() - expected).abs().max() / expected.abs().max()
        assert error <= tol, (dtype, layout, error.item())


def _fused_backward(grad, x, hidden, weight, bias, k):
    grad_input, grad_hidden = (module.empty_like_layout(t) for t in (x, hidden))
    acc = torch.promote_types(x.dtype, torch.float32)
    grad_weight_bias = weight.new_zeros(weight.shape[0], weight.shape[1] + 1, dtype=acc)
    _fused_kernel().predicted_idwconv2d_backward(grad, x, hidden, weight, bias, k, grad_input,
                                                 grad_hidden, grad_weight_bias)
    return grad_input, grad_hidden, grad_weight_bias[:, :-1], grad_weight_bias[:, -1]


def _reference_grads(grad, x, hidden, weight, bias, k):
    operands = [t.detach().double().requires_grad_() for t in (x, hidden, weight, bias)]
    unfold_reference(*operands, k).backward(grad.double())
    return [t.grad for t in operands]


@pytest.mark.parametrize('shape', FUSED_SHAPES)
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'strided'])
def test_fused_backward_matches_unfold_reference(shape, layout):
    b, c, r, g, k, h, w = shape
    x, hidden, weight, bias = _operands(b, c, r, g, k, h, w)
    grad = torch.randn_like(x)
    if layout == 'channels_last':
        x, hidden, grad = (t.contiguous(memory_format=torch.channels_last)
                           for t in (x, hidden, grad))
    elif layout == 'strided':
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        hidden = torch.cat([hidden, hidden[:, :2]], 1)[:, :r]
    expected = _reference_grads(grad, x, hidden, weight, bias, k)
    for out, ref in zip(_fused_backward(grad, x, hidden, weight, bias, k), expected):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape', FUSED_SHAPES[:4])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2**-18), (torch.bfloat16, 2**-7),
                                       (torch.float16, 2**-10)])
def test_fused_backward_in_low_precision(shape, dtype, tol):
    """float32 sums; the input and hidden gradients rounded once to the dtype, the weight
    and bias gradients kept in float32 (relative to the largest of each)."""
    b, c, r, g, k, h, w = shape
    operands = [t.to(dtype) for t in _operands(b, c, r, g, k, h, w)]
    operands[2] = operands[2] * 0.25
    grad = torch.randn(b, c, h, w).to(dtype)
    expected = _reference_grads(grad, *operands, k)
    for layout in (torch.contiguous_format, torch.channels_last):
        x, hidden, gy = (t.contiguous(memory_format=layout)
                         for t in (*operands[:2], grad))
        grads = _fused_backward(gy, x, hidden, *operands[2:], k)
        assert [t.dtype for t in grads] == [dtype, dtype, *[torch.float32] * 2]
        for out, ref in zip(grads, expected):
            error = (out.double() - ref).abs().max() / ref.abs().max()
            assert error <= (tol if out.dtype == dtype else 2**-18), (dtype, error.item())


def test_the_kernels_never_reach_memory(monkeypatch):
    """On CPU the kernels are predicted in registers, forward and backward: the chunked
    prediction, which writes them to memory, runs only for a kernel size the fused kernels
    do not cover (9 here) - and for the bfloat16 backward where the CPU has bfloat16 dot
    products, whose matrix products are faster."""
    calls = []
    predict = module._predict
    monkeypatch.setattr(module, '_predict', lambda *a: calls.append(a[-2]) or predict(*a))
    for k in (7, 9):
        operands = [t.requires_grad_() for t in _operands(
            b=2, c=8, r=4, g=2, k=k, h=9, w=10, dtype=torch.float32)]
        out = predicted_idwconv2d(*operands, k)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, operands, grad)
        expected = _reference_grads(grad, *operands, k)
        torch.testing.assert_close(
            out.double(), unfold_reference(*(t.double() for t in operands), k),
            rtol=1e-5, atol=1e-5)
        for ours, ref in zip(grads, expected):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    assert calls == [9, 9]  # forward and backward
    ops = _fused_kernel()
    assert ops.predicted_idwconv2d_applies(7, torch.bfloat16, False)
    assert ops.predicted_idwconv2d_applies(7, torch.bfloat16, True) != (
        ops.bf16_dot_products())


def test_chunks_follow_the_budget(monkeypatch):
    x = torch.zeros(5, 8, 6, 7)
    monkeypatch.setitem(module.CHUNK_BYTES, 'cpu', 2 * 36 * 42 * 4)  # two samples' kernels
    assert module._chunks(x, 36) == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setitem(module.CHUNK_BYTES, 'cpu', 1)  # at least one sample
    assert module._chunks(x, 36) == [(i, i + 1) for i in range(5)]


def test_the_kernels_are_not_saved_for_backward():
    """Autograd keeps only tensors of the features' or the predictor's size, never the
    (B, G, K, K, H, W) kernels (16x the features at DWNet's settings)."""
    from mmdwnet.models.utils import InhomogeneousDynamicDWConv
    conv = InhomogeneousDynamicDWConv(32, kernel_size=7, group_channels=1)  # G*K*K = 1568
    x = torch.randn(2, 32, 14, 14, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        y = conv(x)
    kernels = 2 * 32 * 49 * 14 * 14
    assert saved and max(saved) < kernels / 10, (max(saved), kernels)
    y.sum().backward()
    assert all(p.grad is not None for p in conv.parameters())


def test_layouts_follow_the_operands():
    x, hidden, weight, bias = _operands(dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    hidden = hidden.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = predicted_idwconv2d(x, hidden, weight, bias, 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out).contiguous(memory_format=torch.channels_last)
    gx, gh = torch.autograd.grad(out, (x, hidden), grad)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert gh.is_contiguous(memory_format=torch.channels_last)


def test_autocast_bfloat16_predicts_and_applies_in_bfloat16():
    x, hidden, weight, bias = (t.requires_grad_() for t in _operands(
        b=2, c=16, r=4, g=4, k=7, h=9, w=9, dtype=torch.float32))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = predicted_idwconv2d(x, hidden, weight, bias, 7)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (x, hidden, weight, bias))
    # the same bfloat16-rounded operands in float64; the fused CPU kernel keeps the
    # predicted kernel values in float32 (the chunked path would round them to bfloat16)
    assert _fused_kernel().predicted_idwconv2d_applies(7, torch.bfloat16, False)
    low = [t.detach().bfloat16().double() for t in (x, hidden, weight, bias)]
    kernels = (torch.einsum('or,brhw->bohw', low[2], low[1]) + low[3].view(1, -1, 1, 1))
    expected = reference_idwconv(low[0], kernels.view(2, 4, 7, 7, 9, 9))
    # float32 sums of bfloat16 products, rounded once: a bfloat16 rounding of the result
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2**-8 * 4)


def test_registered_custom_ops_pass_opcheck():
    x, hidden, weight, bias = _operands()
    torch.library.opcheck(torch.ops.mmdwnet.predicted_idwconv2d.default,
                          (x.requires_grad_(), hidden.requires_grad_(), weight, bias, 3))
    torch.library.opcheck(torch.ops.mmdwnet.predicted_idwconv2d_backward.default,
                          (torch.randn_like(x), x.detach(), hidden.detach(), weight, bias, 3))


def test_bad_operands_are_named():
    x, hidden, weight, bias = _operands()
    with pytest.raises(ValueError, match=r'`hidden` must be a 4-D \(B, R, H, W\) tensor '
                       r'matching `input` \(3, 8, 5, 6\), got a tensor of shape \(3, 2, 5, 5\)'):
        predicted_idwconv2d(x, hidden[..., :5], weight, bias, 3)
    with pytest.raises(ValueError, match=r'`weight` must be \(G\*K\*K, R\) = \(G\*25, 2\)'):
        predicted_idwconv2d(x, hidden, weight, bias, 5)
    with pytest.raises(TypeError, match='same dtype, got torch.float32, torch.float64'):
        predicted_idwconv2d(x.float(), hidden, weight, bias, 3)


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2**-20),
                                       (torch.bfloat16, 2**-7)])
def test_output_affine_map_and_relu(dtype, tol, monkeypatch):
    """``relu(y * scale + shift)``: in inference on CPU inside the fused kernel, on its
    float32 sums before they are rounded (the registered operator is not called); with
    autograd after the operator, with gradients for ``scale`` and ``shift`` too. Both
    within a rounding of the dtype (relative to the largest output) of float64."""
    b, c, r, g, k, h, w = FUSED_SHAPES[0]
    operands = [t.to(dtype) for t in _operands(b, c, r, g, k, h, w)]
    operands[2] = operands[2] * 0.25
    gen = torch.Generator().manual_seed(1)
    acc = torch.promote_types(dtype, torch.float32)
    scale, shift = (torch.randn(c, generator=gen, dtype=acc) for _ in range(2))
    y = unfold_reference(*(t.double() for t in operands), k)
    expected = torch.relu(y * scale.double()[:, None, None] + shift.double()[:, None, None])
    calls, forward = [], module._forward
    monkeypatch.setattr(module, '_forward', lambda *a: calls.append(a) or forward(*a))
    for layout in (torch.contiguous_format, torch.channels_last):
        x, hidden = (t.contiguous(memory_format=layout) for t in operands[:2])
        with torch.no_grad():
            out = predicted_idwconv2d(x, hidden, *operands[2:], k, scale, shift, relu=True)
        assert calls == [] and out.dtype == dtype and out.is_contiguous(memory_format=layout)
        error = (out.double() - expected).abs().max() / expected.abs().max()
        assert error <= tol, (layout, error.item())
        assert (out >= 0).all() and (out == 0).float().mean() > 0.3  # the ReLU applied
    # with autograd: the operator, then the map and the ReLU, differentiable
    leaves = [t.detach().requires_grad_() for t in (*operands, scale, shift)]
    out = predicted_idwconv2d(*leaves[:4], k, *leaves[4:], relu=True)
    assert len(calls) == 1
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error <= tol, ('autograd', error.item())
    grad = torch.randn_like(out)
    out.backward(grad)
    # d/d shift: the output gradient where the ReLU passed it, summed per channel
    ref = (grad.double() * (out > 0)).sum((0, 2, 3))
    assert (leaves[5].grad.double() - ref).abs().max() <= 2 * tol * ref.abs().max()
    # d/d scale: the same times the operator's output (within its rounding, term by term)
    terms = grad.double() * (out > 0) * y
    error = (leaves[4].grad.double() - terms.sum((0, 2, 3))).abs()
    assert (error <= 2 * tol * terms.abs().sum((0, 2, 3))).all()
    # only the affine map, no ReLU: values below zero stay
    with torch.no_grad():
        out = predicted_idwconv2d(*operands, k, scale, shift)
    assert len(calls) == 1 and (out < 0).any()


def test_bad_output_map_is_named():
    x, hidden, weight, bias = _operands()
    with pytest.raises(ValueError, match=r'`scale` and `shift` must both be given as \(8,\) '
                       r'tensors or both be None, got a tensor of shape \(8,\) and NoneType'):
        predicted_idwconv2d(x, hidden, weight, bias, 3, torch.ones(8))
    with pytest.raises(ValueError, match=r'got a tensor of shape \(4,\) and a tensor'):
        predicted_idwconv2d(x, hidden, weight, bias, 3, torch.ones(4), torch.ones(4))


def test_empty_batch():
    x, hidden, weight, bias = (t[:0] if t.dim() == 4 else t for t in _operands())
    out = predicted_idwconv2d(x.requires_grad_(), hidden, weight, bias, 3)
    assert out.shape == (0, 8, 5, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_kernel_transposes_channels_last_maps_exactly(dtype):
    """Identity kernels (every prediction weight zero, the bias 1 at the centre tap):
    the output is the input and the input gradient the output gradient, bit for bit. The
    fused kernels transpose channels-last maps to NCHW planes and back in 8 x 8 tiles (2-
    and 4-byte types in vector registers): 20 channels and 99 pixels leave partial tiles
    of both; `hidden`, a channel slice of a wider channels-last map, is transposed too."""
    b, c, r, g, k, h, w = 3, 20, 4, 5, 3, 9, 11
    gen = torch.Generator().manual_seed(1)
    x, grad, hidden = (torch.randn(b, n, h, w, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)[:, :m] for n, m in ((c, c), (c, c), (r + 3, r)))
    weight = torch.zeros(g * k * k, r, dtype=dtype)
    bias = torch.zeros(g, k * k, dtype=dtype)
    bias[:, k * k // 2] = 1
    bias = bias.flatten()
    out = _fused_kernel().predicted_idwconv2d(x, hidden, weight, bias, k)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, x)
    grad_input = _fused_backward(grad, x, hidden, weight, bias, k)[0]
    assert torch.equal(grad_input, grad)
