"""Linear layers fused with what follows them into one oneDNN operation, for inference
on CPU: the FFN's first layer with its GELU (:class:`LinearGELU`) and its second layer
with the residual addition (:class:`LinearAdd`)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdwnet.ops import in_export_mode


def _fused_op():
    """oneDNN's linear + pointwise operator where this torch build has it, else None
    (its ``.binary`` overload adds a second operand)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _plain(x: Tensor) -> bool:
    """Whether ``x`` takes the standard layers: tracers, compilers and exporters see them,
    and oneDNN's kernels run on CPU only."""
    return (in_export_mode() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or x.device.type != 'cpu' or not x.numel())


def _operands(layer: nn.Linear, x: Tensor):
    """``x``, the weight and the bias of ``layer`` in the dtype the fused kernel takes:
    the autocast dtype under CPU autocast, as for ``F.linear``."""
    weight, bias = layer.weight, layer.bias
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype:
        raise TypeError(f'{type(layer).__name__}: input dtype {x.dtype} differs from the '
                        f'weight dtype {weight.dtype}')
    return x.contiguous(), weight, bias


def _without_autograd(layer: nn.Linear, *tensors: Tensor) -> bool:
    return not (torch.is_grad_enabled() and
                (layer.weight.requires_grad or any(t.requires_grad for t in tensors)))


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
    to each output block while it is still in cache (``torch.ops.mkldnn._linear_pointwise``,
    the kernel torch.compile's CPU backend fuses these two into): a separate GELU reads and
    writes the FFN's 4C-wide hidden map once more. Measured on an AMD EPYC (2 threads,
    batch 16): DW-T float32 inference went from 82% to 85% of the matrix-product peak; in
    bfloat16 no gain was measurable. Elsewhere it is ``F.gelu(F.linear(x))``.
    Under autocast the operands are cast to the autocast dtype, as for ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        fused = None if _plain(x) else _fused_op()
        if fused is not None and _without_autograd(self, x):
            return fused(*_operands(self, x), 'gelu', [], 'none')
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
    Elsewhere, and where ``identity`` is not of the product's dtype (under autocast the
    sum would otherwise be rounded to it), it is ``identity + F.linear(x)``.
    """

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        if identity is None:
            return F.linear(x, self.weight, self.bias)
        fused = None if _plain(x) else _fused_op()
        if fused is not None and _without_autograd(self, x, identity):
            x, weight, bias = _operands(self, x)
            if (identity.dtype == x.dtype and identity.shape[:-1] == x.shape[:-1]
                    and identity.shape[-1] == self.out_features):
                return fused.binary(x, identity.contiguous(), weight, bias, 'add')
        return identity + F.linear(x, self.weight, self.bias)
