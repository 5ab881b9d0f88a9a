"""The matrix products a model computes, recorded from one forward pass and timed alone.

A model cannot run faster than its matrix products run on their own: the time the
machine's matrix-product library (oneDNN or MKL on CPU, cuBLAS on CUDA) takes for each
product the model computes, at its shape and dtype, with nothing else in between. The
benchmark reports that bound beside the one of the measured peak: where a target is above
what the products alone allow, no work outside them (norms, activations, depth-wise
convolutions, additions, copies) can reach it on the machine at hand.

The products are recorded below autocast (so in the dtype they run in) by a
``TorchDispatchMode``: matrix multiplications and linear layers, convolutions with one
group (a product of the im2col matrix and the filters), and the kernel prediction inside
mmdwnet's fused I-D-DW operator. Depth-wise and grouped convolutions and every other
operation count as free, so the bound can only be generous: an operation it does not
know makes it looser, never tighter.
"""
import statistics
import time
from collections import Counter, namedtuple
from math import prod
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['Product', 'record_matrix_products', 'product_flops', 'matmul_libraries',
           'time_product', 'products_seconds', 'synchronize']

# ``batch`` products of (m, k) by (k, n) matrices in ``dtype`` (its name, e.g. 'bfloat16')
Product = namedtuple('Product', 'batch m k n dtype')

_aten = torch.ops.aten
_MATMULS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.mv,
            _aten.addmv, _aten.dot}
_WITH_INPUT = {_aten.addmm, _aten.baddbmm, _aten.addmv}  # (input, a, b): input + a @ b
_CONVOLUTIONS = {_aten.conv2d, _aten.convolution, _aten._convolution,
                 _aten.mkldnn_convolution}
_PREDICTED_IDWCONV = ('mmdwnet::predicted_idwconv2d', 'mmdwnet_cpu::predicted_idwconv2d')


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).split('.')[-1]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> Product:
    """``a @ b`` with torch.matmul's broadcasting (a 1-D operand is one row or column),
    for the matrix-vector and dot products too."""
    if b.dim() == 1:
        return Product(1, a.numel() // a.shape[-1], a.shape[-1], 1, _dtype(a))
    if a.dim() == 1:
        return Product(prod(b.shape[:-2]), 1, a.shape[0], b.shape[-1], _dtype(a))
    if b.dim() == 2:  # a linear map of every row of a
        return Product(1, a.numel() // a.shape[-1], a.shape[-1], b.shape[1], _dtype(a))
    batch = max(prod(a.shape[:-2]), prod(b.shape[:-2]))
    return Product(batch, a.shape[-2], a.shape[-1], b.shape[-1], _dtype(a))


def _product(func, args, out):
    """The product ``func(*args)`` (with output ``out``) computed, or None where it is
    not one (or not one this module knows)."""
    packet, overload = func.overloadpacket, func._overloadname
    name = func.name().split('.')[0]  # without the overload
    if packet in _MATMULS:
        a, b = args[1:3] if packet in _WITH_INPUT else args[:2]
        return _matmul(a, b)
    if packet is _aten.linear or name == 'mkldnn::_linear_pointwise':
        x, weight = (args[0], args[2]) if overload == 'binary' else args[:2]
        return Product(1, x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], _dtype(x))
    if packet in _CONVOLUTIONS or name == 'mkldnn::_convolution_pointwise':
        x, weight = (args[0], args[2]) if overload == 'binary' else args[:2]
        if (x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]
                or out.dim() != 4):  # depth-wise, grouped or not 2-D: not counted
            return None
        return Product(1, out.shape[0] * out.shape[2] * out.shape[3], weight[0].numel(),
                       weight.shape[0], _dtype(x))
    if name in _PREDICTED_IDWCONV:  # (G*K*K, R) weight by the (B, R, H, W) hidden map
        hidden, weight = args[1:3]
        return Product(1, hidden.numel() // hidden.shape[1], hidden.shape[1],
                       weight.shape[0], _dtype(hidden))
    return None


class _Recorder(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.products = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # the mode is off inside this call: an operation's own products (a linear layer's
        # addmm) are not seen again
        out = func(*args, **(kwargs or {}))
        product = _product(func, args, out)
        if product is not None:
            self.products[product] += 1
        return out


def record_matrix_products(fn: Callable[[], object]) -> Counter:
    """The matrix products ``fn()`` computes: a Counter of :class:`Product` (how many
    times each), in the dtype each runs in (under autocast: the autocast dtype)."""
    recorder = _Recorder()
    with recorder:
        fn()
    return recorder.products


def product_flops(products: Dict[Product, int]) -> int:
    """Floating-point operations of ``products`` (2 per multiply-add)."""
    return sum(2 * p.batch * p.m * p.k * p.n * count for p, count in products.items())


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on CPU."""
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)


def matmul_libraries(device: str = 'cpu', batched: bool = False) -> Dict[str, Callable]:
    """The ways the models' products run on ``device``, each as ``f(a, b_t)`` computing
    ``a @ b_t.T`` (``b_t`` laid out as a linear layer's weight): ``torch.mm`` (MKL or
    oneDNN, as PyTorch picks per dtype; cuBLAS on CUDA) and, on CPU with oneDNN, oneDNN's
    linear layer, which DWNet's deploy form and its fused layers call. They are not
    equally fast: on an AMD EPYC (Zen 4, 2 threads) in float32, ``torch.mm`` (MKL) took
    101 ms for a 2048 x 2048 x 2048 product where oneDNN's took 81 (170 against 213
    GFLOP/s); in bfloat16 both run oneDNN's kernels. ``batched``: ``torch.bmm`` only."""
    if batched:
        return {'torch.bmm': lambda a, b_t: torch.bmm(a, b_t.transpose(1, 2))}
    libraries = {'torch.mm': lambda a, b_t: torch.mm(a, b_t.t())}
    if device == 'cpu' and torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise
        libraries['oneDNN linear'] = lambda a, b_t: linear(a, b_t, None, 'none', [], '')
    return libraries


def time_product(product: Product, device: str = 'cpu', calls: int = 1,
                 seed: int = 0) -> float:
    """Seconds of one ``product`` alone, random operands of its shape and dtype on
    ``device`` (the threads as set), by the fastest of :func:`matmul_libraries`: for
    each, the median of ``calls`` timed calls after one untimed call (kernel selection,
    first-touch page faults). A library that does not take the dtype is left out."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, product.dtype)
    shape = (product.batch, ) if product.batch > 1 else ()
    a = torch.randn(*shape, product.m, product.k, generator=gen).to(device, dtype)
    b_t = torch.randn(*shape, product.n, product.k, generator=gen).to(device, dtype)
    best = float('inf')
    with torch.inference_mode():
        for library in matmul_libraries(device, product.batch > 1).values():
            try:
                library(a, b_t)
            except RuntimeError:  # e.g. a dtype this library has no kernel for
                continue
            times = []
            for _ in range(calls):
                synchronize(device)
                start = time.perf_counter()
                library(a, b_t)
                synchronize(device)
                times.append(time.perf_counter() - start)
            best = min(best, statistics.median(times))
    return best


def products_seconds(products: Dict[Product, int],
                     timer: Callable[[Product], float] = time_product) -> float:
    """Seconds that ``products`` take one after another, each product's ``timer(product)``
    (:func:`time_product` by default) times how often it occurs."""
    return sum(timer(p) * count for p, count in products.items())
