"""analysis_tools.matrix_products: the products a model computes, for the benchmark's
products-alone bound (exact shapes and counts, in-process; no timings asserted)."""
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from analysis_tools import matrix_products
from analysis_tools.benchmark_utils import build_classifier, inference_model
from analysis_tools.matrix_products import (PREDICTION_TILE, Product, matmul_libraries,
                                            product_flops, products_seconds,
                                            record_matrix_products, time_product)

STAGES = ((96, 56, 2), (192, 28, 2), (384, 14, 6), (768, 7, 2))  # DWNet-T: C, H = W, depth


def dwnet_t_products(dtype, batch=1, predictor=False):
    """DWNet-T's products at 224x224, from the architecture: the stem's 4x4 patches, per
    block two 1x1 convolutions and the FFN's two layers, patch merging, the head; with
    ``predictor``, I-D-DW's kernel prediction (C -> C/4 -> 32 groups x 7 x 7), the second
    product inside the fused operator, timed in tiles of ``PREDICTION_TILE`` rows."""
    expected = Counter({Product(1, batch * 56 * 56, 48, 96, dtype): 1,
                        Product(1, batch, 768, 1000, dtype): 1})
    for i, (c, h, depth) in enumerate(STAGES):
        m = batch * h * h
        if i:
            expected[Product(1, m, 2 * c, c, dtype)] += 1  # 2x2 patches of C / 2 channels
        for k, n in ((c, c), (c, c), (c, 4 * c), (4 * c, c)):
            expected[Product(1, m, k, n, dtype)] += depth
        if predictor:
            expected[Product(1, m, c, c // 4, dtype)] += depth
            whole, rest = divmod(m, PREDICTION_TILE)
            if whole:
                expected[Product(1, PREDICTION_TILE, c // 4, 32 * 49, dtype)] += whole * depth
            if rest:
                expected[Product(1, rest, c // 4, 32 * 49, dtype)] += depth
    return expected


@pytest.mark.parametrize('name', ['dwconv_t', 'iddwconv_t'])
def test_records_dwnet_products_exactly(name):
    """The deploy form (oneDNN's fused layers, I-D-DW's fused operator) in fp32 and bf16
    autocast, and the training form under autograd, compute the same products; the
    depth-wise convolutions are not among them."""
    model = build_classifier(name).eval()
    deployed = inference_model(model, True)[0]
    x = torch.randn(2, 3, 224, 224)
    for dtype in ('float32', 'bfloat16'):
        with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16,
                                                    enabled=dtype == 'bfloat16'):
            products = record_matrix_products(lambda: deployed(x, mode='tensor'))
        assert products == dwnet_t_products(dtype, 2, name == 'iddwconv_t'), dtype
    products = record_matrix_products(lambda: model(x[:1], mode='tensor'))
    assert products == dwnet_t_products('float32', 1, name == 'iddwconv_t')


def test_records_matmul_broadcasting_convolutions_and_linear_layers():
    """In inference mode composite operations (matmul, linear, conv2d) reach the recorder
    whole, under autograd decomposed: the same products either way, each once."""
    a, w = torch.randn(2, 3, 4, 5), torch.randn(6, 5)
    conv_w, dw_w = torch.randn(8, 3, 3, 3), torch.randn(3, 1, 7, 7)
    image = torch.randn(2, 3, 16, 16)
    for mode in (torch.inference_mode, torch.enable_grad):
        with mode():
            a.requires_grad_(mode is torch.enable_grad)
            products = record_matrix_products(lambda: (
                a @ w.t(), a @ torch.randn(2, 3, 5, 7), torch.matmul(a, torch.randn(5)),
                torch.randn(2, 1, 4, 5) @ torch.randn(3, 5, 7),  # broadcast: 6 products
                F.linear(a, w), torch.addmm(torch.randn(7), torch.randn(3, 5), torch.randn(5, 7)),
                F.conv2d(image, conv_w, stride=2, padding=1),
                F.conv2d(image, dw_w, padding=3, groups=3),  # depth-wise: not counted
                F.conv_transpose2d(image, torch.randn(3, 3, 2, 2), stride=2),  # not counted
                torch.randn(0, 5) @ torch.randn(5, 4)))  # empty: not counted
        assert products == Counter({Product(1, 24, 5, 6, 'float32'): 2,
                                    Product(6, 4, 5, 7, 'float32'): 2,
                                    Product(1, 24, 5, 1, 'float32'): 1,
                                    Product(1, 3, 5, 7, 'float32'): 1,
                                    Product(1, 2 * 8 * 8, 27, 8, 'float32'): 1}), mode


def test_time_product_takes_the_fastest_library_and_names_a_failure(monkeypatch):
    """The fastest library counts, one that raises is left out, and where none computes
    the product the error names the product and each library's error."""
    product = Product(1, 64, 32, 16, 'float32')

    def slow(a, b_t):
        time.sleep(0.05)
        return a @ b_t.T

    def broken(a, b_t):
        raise RuntimeError('no kernel')

    monkeypatch.setattr(matrix_products, 'matmul_libraries',
                        lambda device, batched, dtype=None: {
                            'slow': slow, 'broken': broken, 'fast': lambda a, b_t: a @ b_t.T})
    assert time_product(product, calls=3) < 0.05
    monkeypatch.setattr(matrix_products, 'matmul_libraries',
                        lambda device, batched, dtype=None: {'slow': slow, 'broken': broken})
    assert time_product(product) >= 0.05
    monkeypatch.setattr(matrix_products, 'matmul_libraries',
                        lambda device, batched, dtype=None: {'broken': broken})
    with pytest.raises(RuntimeError, match=r"time_product: none of \['broken'\] computes "
                       r"Product\(batch=1, m=64, k=32, n=16, dtype='float32'\) on 'cpu': "
                       r"\{'broken': RuntimeError\('no kernel'\)\}"):
        time_product(product)
    with pytest.raises(ValueError, match='time_product: `calls` must be >= 1, got 0'):
        time_product(product, calls=0)


def test_products_seconds_and_flops_add_up():
    p, q = Product(1, 10, 20, 30, 'bfloat16'), Product(4, 5, 6, 7, 'float32')
    products = Counter({p: 2, q: 3})
    assert product_flops(products) == 2 * (10 * 20 * 30 * 2 + 4 * 5 * 6 * 7 * 3)
    assert products_seconds(products, timer={p: 0.5, q: 0.25}.get) == pytest.approx(1.75)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_every_matmul_library_computes_the_product(dtype):
    """The libraries the products and the peak are timed with (the fastest counts) all
    compute ``a @ b_t.T`` (``b_t`` laid out as a linear layer's weight)."""
    gen = torch.Generator().manual_seed(0)
    a, b_t = torch.randn(33, 20, generator=gen), torch.randn(17, 20, generator=gen)
    from mmdwnet.ops.dispatch import onednn_dtypes
    libraries = matmul_libraries('cpu', dtype=dtype)
    # oneDNN's linear layer where this CPU has its kernels for the dtype (bfloat16 needs
    # AVX-512 or AVX-NE-CONVERT)
    onednn = torch.backends.mkldnn.is_available() and dtype in onednn_dtypes()
    assert set(libraries) == ({'torch.mm', 'oneDNN linear'} if onednn else {'torch.mm'})
    assert set(matmul_libraries('cpu')) == ({'torch.mm', 'oneDNN linear'}
                                            if torch.backends.mkldnn.is_available()
                                            else {'torch.mm'})
    expected = (a.to(dtype).float() @ b_t.to(dtype).float().T)
    for name, library in libraries.items():
        out = library(a.to(dtype), b_t.to(dtype))
        assert out.dtype == dtype and out.shape == (33, 17), name
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2, msg=name)
    batched, = matmul_libraries('cpu', batched=True).values()
    out = batched(torch.stack([a, 2 * a]).to(dtype), torch.stack([b_t, b_t]).to(dtype))
    torch.testing.assert_close(out.float(), torch.stack([expected, 2 * expected]), rtol=1e-2,
                               atol=2e-2)
