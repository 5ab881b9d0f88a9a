"""Layers fused with what follows them into one oneDNN operation, for inference on CPU
(DWNet's deploy form): the FFN's first linear layer with its GELU (:class:`LinearGELU`),
its second layer with the residual addition (:class:`LinearAdd`), and likewise the
spatial half's first 1x1 convolution with its ReLU (:class:`Conv2dReLU`) and its last
with the residual addition (:class:`Conv2dAdd`). Each keeps the parameters and
state-dict keys of the layer it replaces, and computes the same function elsewhere
(autograd, other devices, tracing and export) with the standard layers.

The additions are fused in float32 only: under bfloat16 autocast oneDNN's kernels with the
addition took as long as the product and a separate addition, or longer (AMD EPYC with
AVX-512 BF16, 2 threads, batch 16, DWNet-T's shapes: the 1x1 convolutions 3.87 against 4.27
ms at stage 1, 3.02 against 2.86 ms at stage 3; the FFN's second layers the same within
0.2 ms at every stage).
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdwnet.ops import in_export_mode


def _mkldnn_op(name: str):
    """oneDNN's ``torch.ops.mkldnn.<name>`` (the kernels torch.compile's CPU backend
    fuses into) where this torch build has it, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return None


def _plain(x: Tensor) -> bool:
    """Whether ``x`` takes the standard layers: tracers, compilers and exporters see them,
    and oneDNN's kernels run on CPU only."""
    return (in_export_mode() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or x.device.type != 'cpu' or not x.numel())


def _operands(owner: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``x``, ``weight`` and ``bias`` in the dtype the fused kernel takes: the autocast
    dtype under CPU autocast, as for ``F.linear``. ``x`` keeps its memory format: oneDNN's
    convolutions return their output in the input's (channels-last maps stay
    channels-last), and the linear layers take any strides. ``owner`` names the layer in
    the error for an input whose dtype is not the weight's."""
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype:
        raise TypeError(f'{owner}: input dtype {x.dtype} differs from the weight dtype '
                        f'{weight.dtype}')
    return x, weight, bias


@functools.lru_cache(maxsize=None)
def onednn_dtypes() -> tuple:
    """The dtypes oneDNN's kernels take on this CPU: float32, and bfloat16 / float16 where
    the CPU has the instructions oneDNN needs for them (AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    for bfloat16; an AVX2-only CPU has neither, and the kernels raise there)."""
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.append(torch.float16)
    return tuple(dtypes)


def _fused(name: str, weight: Tensor, *tensors: Tensor, float32_only: bool = False):
    """The oneDNN operator ``name`` where it may run with the parameter ``weight`` on
    ``tensors``: on CPU, outside tracing and export, without autograd (it has no
    backward), and in a dtype oneDNN takes (the autocast dtype, else the weight's); else
    None. ``float32_only``: only for float32 operands outside autocast (CPU autocast always
    lowers the precision)."""
    if _plain(tensors[0]) or (torch.is_grad_enabled() and (
            weight.requires_grad or any(t.requires_grad for t in tensors))):
        return None
    autocast = torch.is_autocast_enabled('cpu')
    dtype = torch.get_autocast_dtype('cpu') if autocast else weight.dtype
    if dtype not in onednn_dtypes():
        return None
    if float32_only and (tensors[0].dtype != torch.float32 or autocast):
        return None
    return _mkldnn_op(name)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CPU without autograd, oneDNN's linear layer
    instead of PyTorch's ``addmm`` (under autocast too, as the fused layers below).

    The dynamic depth-wise kernels are predicted by a product with one row per image,
    (B, C/4) x (C/4, C*K*K), bound by reading its weight (28 MiB at D-DW-T's last stage,
    27M of its 51M parameters in all). Measured on an AMD EPYC (2 threads, batch 16, fp32,
    the 12 layers of D-DW-T): 17.0 ms with ``F.linear``, 10.5 ms with oneDNN's.
    """
    fused = _fused('_linear_pointwise', weight, x, *([] if bias is None else [bias]))
    if fused is None:
        return F.linear(x, weight, bias)
    return fused(*_operands('linear', x, weight, bias), 'none', [], '')


def _addable(identity: Tensor, x: Tensor, shape) -> bool:
    """Whether oneDNN can add ``identity`` to a product of ``shape`` computed in ``x``'s
    dtype: the identity must have that dtype and the product's shape (no broadcasting)."""
    return identity.dtype == x.dtype and tuple(identity.shape) == tuple(shape)


def add_to_product(identity: Tensor, product: Tensor) -> Tensor:
    """``identity + product`` for a ``product`` the caller has just computed and holds
    alone: without autograd on CPU, where the sum has the product's dtype and shape, added
    in place into it. A new tensor for the sum is memory that has to be brought into the
    cache as it is written; at DWNet-T's first stage (bfloat16, batch 16) the addition took
    0.59 instead of 0.82 ms. Elsewhere (autograd, other devices, tracing and export, a sum
    that promotes or broadcasts beyond the product) the out-of-place addition."""
    if (_plain(product) or identity.dtype != product.dtype
            or (torch.is_grad_enabled() and (product.requires_grad or identity.requires_grad))
            or torch.broadcast_shapes(identity.shape, product.shape) != product.shape):
        return identity + product
    return product.add_(identity)


class _FusedLinear(nn.Linear):

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> '_FusedLinear':
        """The same layer (parameters, device, dtype) as this class."""
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        fused.load_state_dict(linear.state_dict())
        return fused


class LinearGELU(_FusedLinear):
    """``GELU(Linear(x))`` with the parameters (and state-dict keys) of the ``nn.Linear``.

    On CPU without autograd it is oneDNN's linear layer with the exact (erf) GELU applied
    to each output block while it is still in cache (``torch.ops.mkldnn._linear_pointwise``):
    a separate GELU reads and writes the FFN's 4C-wide hidden map once more. Measured on an
    AMD EPYC (2 threads, batch 16): DW-T float32 inference went from 82% to 85% of the
    matrix-product peak; in bfloat16 no gain was measurable. Elsewhere it is
    ``F.gelu(F.linear(x))``. Under autocast the operands are cast to the autocast dtype,
    as for ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused('_linear_pointwise', self.weight, x)
        if fused is not None:
            x, weight, bias = _operands(type(self).__name__, x, self.weight, self.bias)
            return fused(x, weight, bias, 'gelu', [], 'none')
        return F.gelu(F.linear(x, self.weight, self.bias))


class LinearAdd(_FusedLinear):
    """``identity + Linear(x)`` with the parameters (and state-dict keys) of the
    ``nn.Linear``; called with ``x`` alone it is the ``nn.Linear``.

    On CPU without autograd it is oneDNN's linear layer with the addition applied to each
    output block while it is still in cache (``torch.ops.mkldnn._linear_pointwise.binary``):
    the separate addition reads the product and the identity and writes the sum, and
    PyTorch's ``addmm`` first broadcasts the bias into the output. Measured on an AMD EPYC
    (2 threads, batch 16, DWNet-T's FFN second layers): 29.1 -> 20.8 ms at stage 1
    (50176 x 384 -> 96), 21.9 -> 18.8 ms at stage 2, 1.7 ms less at stages 3 and 4.
    Under bfloat16 autocast (where the fused addition gained nothing) it is oneDNN's
    linear layer, the bias added inside the kernel, and the addition in place into its
    output (:func:`add_to_product`): oneDNN's layer instead of ``F.linear`` took DWNet-T's
    12 layers with their additions from 130.4 to 124.3 ms, the same sums. Elsewhere
    (autograd, other devices, tracing and export) it is ``identity + F.linear(x)``, and
    where ``identity`` is not of the product's dtype the product (oneDNN's without
    autograd on CPU) plus ``identity``, out of place.
    """

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        if identity is None:
            return F.linear(x, self.weight, self.bias)
        fused = _fused('_linear_pointwise', self.weight, x, identity, float32_only=True)
        if fused is not None:
            x, weight, bias = _operands(type(self).__name__, x, self.weight, self.bias)
            if _addable(identity, x, (*x.shape[:-1], self.out_features)):
                return fused.binary(x, identity.contiguous(), weight, bias, 'add')
        return add_to_product(identity, linear(x, self.weight, self.bias))


class _FusedConv2d(nn.Conv2d):

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> '_FusedConv2d':
        """The same convolution (parameters, device, dtype) as this class."""
        if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
            raise ValueError(f'{cls.__name__}: the convolution must have numeric zero '
                             f'padding, got padding={conv.padding!r}, '
                             f'padding_mode={conv.padding_mode!r}')
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        fused.load_state_dict(conv.state_dict())
        return fused

    def _geometry(self) -> tuple:
        return (list(self.padding), list(self.stride), list(self.dilation), self.groups)


class Conv2dReLU(_FusedConv2d):
    """``ReLU(Conv2d(x))`` with the parameters (and state-dict keys) of the ``nn.Conv2d``.

    On CPU without autograd it is oneDNN's convolution with the ReLU applied to each
    output block (``torch.ops.mkldnn._convolution_pointwise``), saving a pass over the
    output (under bfloat16 autocast too: on an AMD EPYC, 2 threads, batch 16, DWNet-T's
    1x1 convolutions at stage 1 took 3.28 instead of 4.01 ms, at stage 3 2.58 instead of
    2.82); elsewhere ``F.relu(conv(x))``.
    """

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused('_convolution_pointwise', self.weight, x)
        if fused is not None:
            x, weight, bias = _operands(type(self).__name__, x, self.weight, self.bias)
            return fused(x, weight, bias, *self._geometry(), 'relu', [], '')
        return F.relu(super().forward(x))


class Conv2dAdd(_FusedConv2d):
    """``identity + Conv2d(x)`` with the parameters (and state-dict keys) of the
    ``nn.Conv2d``; called with ``x`` alone it is the ``nn.Conv2d``.

    On CPU without autograd it is oneDNN's convolution with the addition applied to each
    output block (``torch.ops.mkldnn._convolution_pointwise.binary``), saving a pass that
    reads two maps and writes one. Under bfloat16 autocast (where the fused addition was
    no faster) the convolution, and the addition in place into its output
    (:func:`add_to_product`). Elsewhere, and where ``identity`` is not of the product's
    dtype, ``identity + conv(x)``.
    """

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        if identity is None:
            return super().forward(x)
        fused = _fused('_convolution_pointwise', self.weight, x, identity, float32_only=True)
        if fused is not None:
            x, weight, bias = _operands(type(self).__name__, x, self.weight, self.bias)
            shape = (x.shape[0], self.out_channels, *self._out_size(x))
            if _addable(identity, x, shape):
                return fused.binary(x, identity, weight, bias, *self._geometry(), 'add',
                                    None, None, [], None)
        return add_to_product(identity, super().forward(x))

    def _out_size(self, x: Tensor) -> tuple:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
            x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride))
