"""Two linear layers with the exact (erf) GELU between them, for training on CPU.

``y = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``

This is the FFN of every DWNet block, about 60% of a float32 training step. Where autograd
records it on CPU in float32, it runs as one autograd function:

- forward: oneDNN's linear layers (``torch.ops.mkldnn._linear_pointwise``, the bias added
  inside the kernel, where PyTorch's ``addmm`` first broadcasts it into the output), and
  between them one compiled pass (``csrc/gelu_cpu.cpp``) that writes GELU(x) over the
  hidden map and GELU'(x) beside it, both from the same exp(-x^2 / 2);
- backward: the hidden gradient is oneDNN's product of the output gradient and the second
  weight with the multiplication by the saved GELU'(x) applied to each output block in
  the kernel (``_linear_pointwise.binary`` with ``'mul'``). PyTorch's ``gelu_backward``
  reads x and the gradient and computes erf and exp again; here no pass over the hidden
  map is left. The input gradients are oneDNN products as well, the weight gradients
  PyTorch's ``mm`` (faster than oneDNN's at these shapes).

Autograd keeps the input, GELU(x) and GELU'(x), as many maps as the standard layers keep
(the input, x and GELU(x)). GELU and GELU' are within 3e-7 * (1 + |x|) of float64, as
close as PyTorch's own float32 ``F.gelu`` and its gradient (2.5e-7 * (1 + |x|)). This is
the ``cpu_kernels`` backend of the operator ``gelu_mlp`` (:mod:`.dispatch`); elsewhere
(other devices and dtypes, autocast, no autograd, tracing, export, or without the
compiled kernels) the ``pytorch`` backend, the standard composition above.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_extension, dispatch

__all__ = ['gelu_mlp']


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


class _GeluMLP(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        x2d = x.reshape(-1, x.shape[-1])
        hidden = _linear(x2d, fc1_weight, fc1_bias)
        derivative = cpu_extension.load().gelu_with_derivative_(hidden)  # hidden := GELU
        out = _linear(hidden, fc2_weight, fc2_bias)
        ctx.save_for_backward(x2d, fc1_weight, fc2_weight, hidden, derivative)
        ctx.input_shape = x.shape
        ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x2d, fc1_weight, fc2_weight, hidden, derivative = ctx.saved_tensors
        grad2d = grad_output.reshape(-1, grad_output.shape[-1])
        grads = [None] * 5
        needs = ctx.needs_input_grad
        if needs[3]:
            grads[3] = grad2d.t().mm(hidden)
        if needs[4] and ctx.has_bias[1]:
            grads[4] = grad2d.sum(0)
        if any(needs[:3]):
            # d loss / d (first layer's output) = (grad @ fc2_weight) * GELU'(x), one kernel
            grad_hidden = torch.ops.mkldnn._linear_pointwise.binary(
                grad2d, derivative, fc2_weight.t().contiguous(), None, 'mul')
            if needs[0]:
                grads[0] = _linear(grad_hidden, fc1_weight.t().contiguous(),
                                   None).view(ctx.input_shape)
            if needs[1]:
                grads[1] = grad_hidden.t().mm(x2d)
            if needs[2] and ctx.has_bias[0]:
                grads[2] = grad_hidden.sum(0)
        return tuple(grads)


def gelu_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``, as
    one autograd function on CPU in float32 (see the module's description).

    Args:
        x (Tensor): Input of shape (..., C_in).
        fc1_weight (Tensor): First layer's weight, (C_hidden, C_in).
        fc1_bias (Tensor, optional): First layer's bias, (C_hidden, ).
        fc2_weight (Tensor): Second layer's weight, (C_out, C_hidden).
        fc2_bias (Tensor, optional): Second layer's bias, (C_out, ).

    Returns:
        Tensor: Output of shape (..., C_out).
    """
    call = dispatch.make_call('gelu_mlp', x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if dispatch.choose(call) is dispatch.CPU_KERNELS:
        return _GeluMLP.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
