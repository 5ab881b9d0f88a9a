"""The matrix products a model computes, recorded from one forward pass and timed alone.

The benchmark's "products alone" bound: the time the machine's matrix-product libraries
(oneDNN or MKL on CPU, cuBLAS on CUDA; the fastest for each product) take for the
products the model computes, at their shapes and dtype, one after another with nothing
else in between. Where a target is above what the products alone allow, no work outside
them (norms, activations, depth-wise convolutions, additions, copies) can reach it on
the machine at hand.

The products are recorded below autocast (so in the dtype they run in) by a
``TorchDispatchMode``: matrix multiplications and linear layers, convolutions with one
group as the product of the im2col matrix and the filters, and the kernel prediction
inside mmdwnet's fused I-D-DW operator. Depth-wise, grouped and transposed convolutions
and every other operation count as free. What the bound assumes: a convolution is timed
as its im2col product, the same product for the 1x1 and non-overlapping patch
convolutions of DWNet, Swin and ConvNeXt (a direct convolution with overlapping kernels
could beat it); the fused I-D-DW operator, which never writes its predicted kernels to
memory, is timed as products of ``PREDICTION_TILE`` rows, whose outputs stay in cache.
"""
import statistics
import time
from collections import Counter, namedtuple
from math import prod
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmdwnet.ops.dispatch import onednn_dtypes

__all__ = ['Product', 'record_matrix_products', 'product_flops', 'matmul_libraries',
           'time_product', 'products_seconds', 'synchronize']

Product = namedtuple('Product', 'batch m k n dtype')
Product.__doc__ = """``batch`` products of (m, k) by (k, n) matrices in ``dtype`` (the
dtype's name, e.g. ``'bfloat16'``)."""
# rows of the I-D-DW kernel prediction timed at once: at DWNet-T's 32 groups of 7 x 7
# kernels, 1.6 MB of float32 predictions, which stay in cache as in the fused kernel
PREDICTION_TILE = 256

_aten = torch.ops.aten
_MATMULS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.mv,
            _aten.addmv, _aten.dot}
_WITH_INPUT = {_aten.addmm, _aten.baddbmm, _aten.addmv}  # (input, a, b): input + a @ b
_CONVOLUTIONS = {_aten.conv2d, _aten.convolution, _aten._convolution,
                 _aten.mkldnn_convolution}
_TRANSPOSABLE = {_aten.convolution, _aten._convolution}  # (..., transposed, ...) at 6
_PREDICTED_IDWCONV = ('mmdwnet::predicted_idwconv2d', 'mmdwnet_cpu::predicted_idwconv2d')


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).split('.')[-1]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> Product:
    """``a @ b`` with torch.matmul's broadcasting (a 1-D operand is one row or column),
    for the matrix-vector and dot products too."""
    if b.dim() <= 2:  # a linear map of every row of a (or one column)
        n = 1 if b.dim() == 1 else b.shape[1]
        return Product(1, a.numel() // a.shape[-1], a.shape[-1], n, _dtype(a))
    if a.dim() == 1:
        return Product(prod(b.shape[:-2]), 1, a.shape[0], b.shape[-1], _dtype(a))
    batch = prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return Product(batch, a.shape[-2], a.shape[-1], b.shape[-1], _dtype(a))


def _tiles(m: int, k: int, n: int, dtype: str) -> List[Tuple[Product, int]]:
    """An (m, k) by (k, n) product as products of ``PREDICTION_TILE`` rows (and the rest)."""
    whole, rest = divmod(m, PREDICTION_TILE)
    tiles = [(Product(1, PREDICTION_TILE, k, n, dtype), whole)] if whole else []
    return tiles + ([(Product(1, rest, k, n, dtype), 1)] if rest else [])


def _products(func, args, out) -> List[Tuple[Product, int]]:
    """The products ``func(*args)`` (with output ``out``) computed, with how many times
    each; empty where it is not one (or not one this module knows)."""
    packet, overload = func.overloadpacket, func._overloadname
    name = func.name().split('.')[0]  # without the overload
    if packet in _MATMULS:
        a, b = args[1:3] if packet in _WITH_INPUT else args[:2]
        return [(_matmul(a, b), 1)] if a.numel() and b.numel() else []
    if packet is _aten.linear or name == 'mkldnn::_linear_pointwise':
        x, weight = (args[0], args[2]) if overload == 'binary' else args[:2]
        if not x.numel() or not weight.numel():
            return []
        return [(Product(1, x.numel() // x.shape[-1], x.shape[-1], weight.shape[0],
                         _dtype(x)), 1)]
    if packet in _CONVOLUTIONS or name == 'mkldnn::_convolution_pointwise':
        x, weight = (args[0], args[2]) if overload == 'binary' else args[:2]
        if packet in _TRANSPOSABLE and args[6]:
            return []  # transposed: not counted
        if (x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]
                or out.dim() != 4 or not out.numel() or not x.numel()):
            return []  # depth-wise, grouped, not 2-D or empty: not counted
        return [(Product(1, out.shape[0] * out.shape[2] * out.shape[3],
                         prod(weight.shape[1:]), weight.shape[0], _dtype(x)), 1)]
    if name in _PREDICTED_IDWCONV:  # (G*K*K, R) weight by the (B, R, H, W) hidden map
        hidden, weight = args[1:3]
        if not hidden.numel():
            return []
        return _tiles(hidden.numel() // hidden.shape[1], hidden.shape[1], weight.shape[0],
                      _dtype(hidden))
    return []


class _Recorder(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.products = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # the mode is off inside this call: an operation's own products (a linear layer's
        # addmm) are not seen again
        out = func(*args, **(kwargs or {}))
        for product, count in _products(func, args, out):
            self.products[product] += count
        return out


def record_matrix_products(fn: Callable[[], object]) -> Counter:
    """The matrix products ``fn()`` computes.

    Args:
        fn (callable): Runs the model (any context, such as autocast or
            ``torch.inference_mode``, is entered by the caller).

    Returns:
        Counter: :class:`Product` -> how many times it is computed, in the dtype each runs
        in (under autocast: the autocast dtype).
    """
    recorder = _Recorder()
    with recorder:
        fn()
    return recorder.products


def product_flops(products: Dict[Product, int]) -> int:
    """Floating-point operations of ``products`` (a :class:`Product` -> count mapping),
    2 per multiply-add."""
    return sum(2 * p.batch * p.m * p.k * p.n * count for p, count in products.items())


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on CPU."""
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)


def matmul_libraries(device: str = 'cpu', batched: bool = False,
                     dtype: Optional[torch.dtype] = None) -> Dict[str, Callable]:
    """The ways the models' products run on ``device``, each as ``f(a, b_t)`` computing
    ``a @ b_t.T`` (``b_t`` laid out as a linear layer's weight).

    ``torch.mm`` (MKL or oneDNN, as PyTorch picks per dtype; cuBLAS on CUDA) and, on CPU
    with oneDNN, oneDNN's linear layer, which DWNet's deploy form and its fused layers
    call. They are not equally fast: on an AMD EPYC (Zen 4, 2 threads) in float32
    ``torch.mm`` (MKL) took 101 ms for a 2048 x 2048 x 2048 product where oneDNN's took 81
    (170 against 213 GFLOP/s); in bfloat16 both run oneDNN's kernels.

    Args:
        device (str): ``'cpu'`` or a CUDA device.
        batched (bool): Batched products: ``torch.bmm`` only. Defaults to False.
        dtype (torch.dtype, optional): The operands' dtype: oneDNN's linear layer only where
            this CPU has oneDNN kernels for it (:func:`onednn_dtypes`). Defaults to None
            (any).

    Returns:
        dict: Library name -> function.
    """
    if batched:
        return {'torch.bmm': lambda a, b_t: torch.bmm(a, b_t.transpose(1, 2))}
    libraries = {'torch.mm': lambda a, b_t: torch.mm(a, b_t.t())}
    if torch.device(device).type == 'cpu' and torch.backends.mkldnn.is_available() and (
            dtype is None or dtype in onednn_dtypes()):
        linear = torch.ops.mkldnn._linear_pointwise
        libraries['oneDNN linear'] = lambda a, b_t: linear(a, b_t, None, 'none', [], '')
    return libraries


def time_product(product: Product, device: str = 'cpu', calls: int = 1,
                 seed: int = 0) -> float:
    """Seconds of one ``product`` alone by the fastest of :func:`matmul_libraries`.

    Random operands of its shape and dtype on ``device``, the threads as set; for each
    library the median of ``calls`` timed calls after one untimed call (kernel selection,
    first-touch page faults). A library that raises a ``RuntimeError`` for the product
    (such as oneDNN's linear layer for a dtype it has no kernel for) is left out.

    Args:
        product (Product): The product.
        device (str): Device to run it on. Defaults to 'cpu'.
        calls (int): Timed calls per library (>= 1). Defaults to 1.
        seed (int): Seed of the random operands. Defaults to 0.

    Returns:
        float: Seconds.
    """
    if calls < 1:
        raise ValueError(f'time_product: `calls` must be >= 1, got {calls}')
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, product.dtype)
    shape = (product.batch, ) if product.batch > 1 else ()
    a = torch.randn(*shape, product.m, product.k, generator=gen).to(device, dtype)
    b_t = torch.randn(*shape, product.n, product.k, generator=gen).to(device, dtype)
    best, errors = float('inf'), {}
    libraries = matmul_libraries(device, product.batch > 1, dtype)
    # not torch.utils.benchmark: called between the models' steps of a repeat, timed as they are
    with torch.inference_mode():
        for name, library in libraries.items():
            try:
                library(a, b_t)
            except RuntimeError as error:
                errors[name] = error
                continue
            times = []
            for _ in range(calls):
                synchronize(device)
                start = time.perf_counter()
                library(a, b_t)
                synchronize(device)
                times.append(time.perf_counter() - start)
            best = min(best, statistics.median(times))
    if len(errors) == len(libraries):
        raise RuntimeError(f'time_product: none of {list(libraries)} computes {product} on '
                           f'{device!r}: {errors}')
    return best


def products_seconds(products: Dict[Product, int],
                     timer: Callable[[Product], float] = time_product) -> float:
    """Seconds that ``products`` (a :class:`Product` -> count mapping) take one after
    another: each product's ``timer(product)`` (:func:`time_product` by default) times
    how often it occurs."""
    return sum(timer(p) * count for p, count in products.items())
