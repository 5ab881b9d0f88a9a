"""The layers fused with their activation or residual addition
(mmdwnet/models/utils/fused_layers.py)."""

import pytest
import torch
import torch.nn.functional as F


def test_linear_add():
    """LinearAdd is the nn.Linear called with one argument, identity + Linear(x) with two
    (fused or not), and keeps the sum in the identity's dtype under autocast."""
    from mmdwnet.models.utils import LinearAdd, LinearGELU
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    fused = LinearAdd.from_linear(linear)
    x, identity = torch.randn(3, 5, 8), torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), linear(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, identity), identity + linear(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = fused(x, identity)  # float32 identity: the sum stays float32
            assert low.dtype == torch.float32
            torch.testing.assert_close(low, identity + linear(x).float())
            low = fused(x, identity.bfloat16())
            assert low.dtype == torch.bfloat16
            torch.testing.assert_close(low.float(), identity + linear(x), rtol=2e-2,
                                       atol=2e-2)
    with pytest.raises(TypeError, match=r'LinearGELU: input dtype torch.float64 differs '
                       r'from the weight dtype torch.float32'):
        with torch.no_grad():
            LinearGELU.from_linear(linear)(x.double())
    # float64 layers, which oneDNN does not take, run the standard layers
    linear.double()
    with torch.no_grad():
        torch.testing.assert_close(LinearGELU.from_linear(linear)(x.double()),
                                   F.gelu(linear(x.double())), rtol=0, atol=0)
        torch.testing.assert_close(LinearAdd.from_linear(linear)(x.double(), identity.double()),
                                   identity.double() + linear(x.double()), rtol=0, atol=0)


def test_add_to_product_in_place_only_where_nothing_changes():
    """add_to_product adds the identity into the product in place without autograd where
    the sum has the product's dtype and shape (broadcast identities included), and out of
    place under autograd, for a sum that promotes or broadcasts beyond the product, and
    while tracing; the same values every way."""
    from mmdwnet.models.utils.fused_layers import add_to_product
    torch.manual_seed(0)
    product, identity = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = identity + product
    cases = [  # (identity, product, in place)
        (identity, product, True),
        (identity[0, 0], product, True),  # broadcast into the product's shape
        (identity.double(), product, False),  # promotes to float64
        (identity, product[:, :1], False),  # broadcasts the product
        (identity.bfloat16(), product, False),
    ]
    with torch.no_grad():
        for a, b, in_place in cases:
            want = a + b
            b = b.clone()
            out = add_to_product(a, b)
            assert (out is b) == in_place, (a.shape, a.dtype, b.shape)
            assert out.dtype == want.dtype and out.shape == want.shape
            torch.testing.assert_close(out, want, rtol=0, atol=0)
    leaf = product.clone().requires_grad_()
    scaled = leaf * 1
    out = add_to_product(identity, scaled)  # autograd: out of place, gradients flow
    assert out is not scaled
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, torch.ones_like(leaf), rtol=0, atol=0)
    traced = torch.jit.trace(lambda a, b: add_to_product(a, b), (identity, product))
    assert 'add_' not in str(traced.graph)
    torch.testing.assert_close(traced(identity, product), expected, rtol=0, atol=0)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_fused_convolutions(memory_format):
    """Conv2dReLU and Conv2dAdd equal ReLU(conv) and identity + conv (stride, padding,
    groups, either layout of the identity; float32, and under bf16 autocast with a float32
    identity the sum stays float32), return the input's memory format, and refuse string
    padding."""
    from mmdwnet.models.utils import Conv2dAdd, Conv2dReLU
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=memory_format)
    identity = torch.randn(2, 12, 5, 4).contiguous(memory_format=memory_format)
    relu, add = Conv2dReLU.from_conv(conv), Conv2dAdd.from_conv(conv)
    with torch.no_grad():
        torch.testing.assert_close(relu(x), F.relu(conv(x)))
        # outputs in the input's memory format, as torch's convolutions (no copies after)
        assert relu(x).is_contiguous(memory_format=memory_format)
        assert add(x, identity).is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(add(x), conv(x), rtol=0, atol=0)
        torch.testing.assert_close(add(x, identity), identity + conv(x))
        torch.testing.assert_close(add(x, identity.contiguous()), identity + conv(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = add(x, identity)
            assert low.dtype == torch.float32
            torch.testing.assert_close(low, identity + conv(x).float())
            low = relu(x)  # the ReLU inside oneDNN's bfloat16 convolution
            assert low.dtype == torch.bfloat16
            assert low.is_contiguous(memory_format=memory_format)
            torch.testing.assert_close(low, F.relu(conv(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Conv2dAdd: the convolution must have numeric zero "
                       r"padding, got padding='same', padding_mode='zeros'"):
        Conv2dAdd.from_conv(torch.nn.Conv2d(8, 8, 3, padding='same'))


def test_linear_in_inference_is_onednns(monkeypatch):
    """`linear` (the D-DW kernel predictor's products) equals F.linear, and is oneDNN's
    linear layer on CPU without autograd in float32 and under bfloat16 autocast; with
    autograd, and in float64, it is F.linear."""
    from mmdwnet.models.utils.fused_layers import linear
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 24), torch.randn(4704, 24), torch.randn(4704)
    weight.requires_grad_()
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', spy, raising=False)
    expected = F.linear(x, weight, bias)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias), expected, rtol=1e-6, atol=1e-5)
        assert linear(x, weight).shape == (16, 4704)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = linear(x, weight, bias)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), expected, rtol=0.02, atol=0.1)
        # bfloat16 where this CPU has oneDNN kernels for it (not on AVX2-only CPUs)
        from mmdwnet.ops.dispatch import onednn_dtypes
        assert calls == [torch.float32, torch.float32] + [
            torch.bfloat16 for _ in range(torch.bfloat16 in onednn_dtypes())]
        torch.testing.assert_close(linear(x.double(), weight.double(), bias.double()),
                                   expected.double(), rtol=1e-6, atol=1e-5)
    n = len(calls)
    out = linear(x, weight, bias)
    assert out.requires_grad and len(calls) == n
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(4704, 24))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_onednn_dtypes_are_those_its_kernels_take_here(dtype):
    """The fused layers use oneDNN only in the dtypes it has kernels for on this CPU: a
    dtype is listed exactly where oneDNN's linear layer computes in it."""
    from mmdwnet.ops.dispatch import onednn_dtypes
    x, weight = torch.randn(8, 16).to(dtype), torch.randn(4, 16).to(dtype)
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, 'none', [], '')
        runs = out.dtype == dtype
    except RuntimeError:
        runs = False
    assert (dtype in onednn_dtypes()) == runs
