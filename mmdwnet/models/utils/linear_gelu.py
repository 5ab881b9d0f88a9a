"""A Linear layer followed by GELU as one oneDNN operation, for inference on CPU."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdwnet.ops import in_export_mode


def _fused_op():
    """oneDNN's linear + pointwise operator where this torch build has it, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class LinearGELU(nn.Linear):
    """``GELU(Linear(x))`` with the parameters (and state-dict keys) of the ``nn.Linear``.

    On CPU without autograd it is oneDNN's linear layer with the exact (erf) GELU applied
    to each output block while it is still in cache (``torch.ops.mkldnn._linear_pointwise``,
    the kernel torch.compile's CPU backend fuses these two into): a separate GELU reads and
    writes the FFN's 4C-wide hidden map once more. Measured on an AMD EPYC (2 threads,
    batch 16): DW-T float32 inference went from 82% to 85% of the matrix-product peak; in
    bfloat16 no gain was measurable. Elsewhere it is ``F.gelu(F.linear(x))``.
    Under autocast the operands are cast to the autocast dtype, as for ``F.linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> 'LinearGELU':
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        fused.load_state_dict(linear.state_dict())
        return fused

    def forward(self, x: Tensor) -> Tensor:
        # tracers, compilers and exporters see the standard linear layer and GELU
        plain = (in_export_mode() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                 or x.device.type != 'cpu')
        fused = None if plain or not x.numel() else _fused_op()
        if (fused is not None and not (torch.is_grad_enabled() and
                                       (x.requires_grad or self.weight.requires_grad))):
            weight, bias = self.weight, self.bias
            if torch.is_autocast_enabled('cpu'):
                dtype = torch.get_autocast_dtype('cpu')
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            elif x.dtype != weight.dtype:
                raise TypeError(f'LinearGELU: input dtype {x.dtype} differs from the '
                                f'weight dtype {weight.dtype}')
            return fused(x.contiguous(), weight, bias, 'gelu', [], 'none')
        return F.gelu(F.linear(x, self.weight, self.bias))
