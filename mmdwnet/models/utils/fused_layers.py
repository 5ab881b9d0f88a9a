"""Layers fused with what follows them into one oneDNN operation, for inference on CPU
(DWNet's deploy form): the FFN's first linear layer with its GELU (:class:`LinearGELU`),
its second layer with the residual addition (:class:`LinearAdd`), and likewise the
spatial half's first 1x1 convolution with its ReLU (:class:`Conv2dReLU`) and its last
with the residual addition (:class:`Conv2dAdd`). Each keeps the parameters and
state-dict keys of the layer it replaces, and computes the same function elsewhere
(autograd, other devices, tracing and export) with the standard layers.

Whether the oneDNN kernel or the standard layers run is the ``onednn`` / ``pytorch``
choice of :mod:`mmdwnet.ops.dispatch` (operators ``linear``, ``linear_gelu``,
``linear_add``, ``conv2d_relu``, ``conv2d_add``). The additions are fused in float32 only:
under bfloat16 autocast oneDNN's kernels with the addition were no faster than the
product and a separate addition at DWNet-T's shapes.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdwnet.ops import dispatch
from .drop_path import residual_drop_path


def _onednn(op: str, kernel: str, weight: Tensor, *tensors: Tensor):
    """oneDNN's ``torch.ops.mkldnn.<kernel>`` where :mod:`mmdwnet.ops.dispatch` chooses
    the ``onednn`` backend for operator ``op`` on ``tensors`` with the parameter
    ``weight``, else None (the standard layers run)."""
    call = dispatch.make_call(op, *tensors, weight, weight_dtype=weight.dtype, kernel=kernel)
    if dispatch.choose(call) is not dispatch.ONEDNN:
        return None
    return getattr(torch.ops.mkldnn, kernel)


def _operands(owner: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``x``, ``weight`` and ``bias`` in the dtype the fused kernel takes: the autocast
    dtype under CPU autocast, as for ``F.linear``. ``x`` keeps its memory format: oneDNN's
    convolutions return their output in the input's (channels-last maps stay
    channels-last), and the linear layers take any strides. ``owner`` names the layer in
    the error for an input whose dtype is not the weight's."""
    x, weight, bias = dispatch.autocast('cpu', x, weight, bias)
    if x.dtype != weight.dtype:
        raise TypeError(f'{owner}: input dtype {x.dtype} differs from the weight dtype '
                        f'{weight.dtype}')
    return x, weight, bias


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CPU without autograd, oneDNN's linear layer
    instead of PyTorch's ``addmm`` (under autocast too, as the fused layers below).

    The dynamic depth-wise kernels are predicted by a product with one row per image,
    (B, C/4) x (C/4, C*K*K), bound by reading its weight (28 MiB at D-DW-T's last stage,
    27M of its 51M parameters in all), where oneDNN's is faster (docs/benchmarks.md,
    design measurements).
    """
    fused = _onednn('linear', '_linear_pointwise', weight, x, bias)
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
    if (dispatch.capturing() or product.device.type != 'cpu' or not product.numel()
            or identity.dtype != product.dtype
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
    a separate GELU reads and writes the FFN's 4C-wide hidden map once more
    (docs/benchmarks.md, design measurements). Elsewhere it is
    ``F.gelu(F.linear(x))``. Under autocast the operands are cast to the autocast dtype,
    as for ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        fused = _onednn('linear_gelu', '_linear_pointwise', self.weight, x)
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
    PyTorch's ``addmm`` first broadcasts the bias into the output. Under bfloat16 autocast
    (where the fused addition gained nothing) it is oneDNN's linear layer, the bias added
    inside the kernel, and the addition in place into its output (:func:`add_to_product`)
    (docs/benchmarks.md, design measurements). Elsewhere
    (autograd, other devices, tracing and export) it is ``identity + F.linear(x)``, and
    where ``identity`` is not of the product's dtype the product (oneDNN's without
    autograd on CPU) plus ``identity``, out of place.
    """

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        if identity is None:
            return F.linear(x, self.weight, self.bias)
        fused = _onednn('linear_add', '_linear_pointwise', self.weight, x, identity)
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
    output, under bfloat16 autocast too; elsewhere ``F.relu(conv(x))``.
    """

    def forward(self, x: Tensor) -> Tensor:
        fused = _onednn('conv2d_relu', '_convolution_pointwise', self.weight, x)
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
        fused = _onednn('conv2d_add', '_convolution_pointwise', self.weight, x, identity)
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


def add_branch(identity: Tensor, layer: nn.Module, x: Tensor, after: nn.Module,
               drop_path: nn.Module) -> Tensor:
    """``identity + drop_path(after(layer(x)))``, a residual branch that ends in ``layer``
    and ``after`` (a norm, a layer scale). Where deploy folding made ``layer`` a layer that
    adds (:class:`Conv2dAdd`, :class:`LinearAdd`) and ``after`` an identity, in eval mode
    (the drop path an identity), the addition runs inside that layer's kernel."""
    if (isinstance(layer, (Conv2dAdd, LinearAdd)) and type(after) is nn.Identity
            and not drop_path.training):
        return layer(x, identity)
    return residual_drop_path(identity, after(layer(x)), drop_path)
