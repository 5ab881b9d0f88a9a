"""Depth-wise K x K convolution (stride 1, zero padding that keeps the size) with kernels
shared by the batch (static DW-Conv) or one set per sample (homogeneous dynamic D-DW-Conv).
Tap ``i`` reads row ``h + i - K // 2`` (and likewise for columns): padding K // 2 on both
sides for odd K; for even K, K // 2 before and K // 2 - 1 after.

Backends (:mod:`.dispatch`): ``export``; ``cpu_kernels`` for channels-last features with
odd square kernels, the registered operator ``mmdwnet::depthwise_conv2d``, which runs the
compiled kernels of ``csrc/depthwise_conv_cpu.cpp`` (every multiply-add a vector
operation along the contiguous channel axis; a register-blocked forward for K = 3, 5, 7,
9 in float32 and bfloat16 with float32 sums) where they are faster than oneDNN's
depth-wise convolution, and oneDNN's where that is (the thresholds below; measurements in
docs/benchmarks.md); ``pytorch``, ``F.conv2d`` with ``groups=C`` (per-sample kernels: one
grouped convolution over the batch folded into channels). The kernel gradient, slow in
PyTorch, is always the compiled kernel on ``cpu_kernels``.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_extension, dispatch, export_form
from .layout import like_input_layout

__all__ = ['depthwise_conv2d', 'DepthwiseConv2d']


def _reference(input: Tensor, weight: Tensor, bias: Optional[Tensor],
               shared: bool) -> Tensor:
    b, c, h, w = input.shape
    k = weight.shape[-1]
    padding = k // 2
    if k % 2 == 0:
        # even K: tap i reads row h + i - K // 2, so K // 2 rows of zeros above, one fewer
        # below (likewise for columns); the output keeps the input's size
        input = F.pad(input, (k // 2, k // 2 - 1, k // 2, k // 2 - 1))
        padding = 0
    if shared:
        return F.conv2d(input, weight, bias, padding=padding, groups=c)
    out = F.conv2d(input.reshape(1, b * c, *input.shape[2:]), weight.reshape(b * c, 1, k, k),
                   padding=padding, groups=b * c).reshape(b, c, h, w)
    return out if bias is None else out + bias.view(1, c, 1, 1)


# Per-sample kernels without the register-blocked compiled kernel (float16, float64, other
# K) run as one oneDNN depth-wise convolution per sample on maps at least this large
# (fastest there); smaller maps, where per-call overhead dominates, run the generic
# compiled kernel over the whole batch at once.
_PER_SAMPLE_ONEDNN_MIN_PIXELS = 400
# Kernels shared by the batch run the register-blocked compiled kernel in float32 on maps
# below this size (where it beats oneDNN's at DWNet-T's stage shapes on Intel and AMD
# CPUs), oneDNN's depth-wise convolution from it on and in bfloat16.
_SHARED_BLOCKED_MAX_PIXELS = 400


def _blocked(kernel_size: int, dtype: torch.dtype) -> bool:
    """Whether the compiled forward runs its register-blocked kernel (as
    ``depthwise_forward`` in ``csrc/depthwise_conv_cpu.cpp`` chooses)."""
    return dtype in (torch.float32, torch.bfloat16) and kernel_size in (3, 5, 7, 9)


def _taps(weight: Tensor, samples: int) -> Tensor:
    """(C, 1, K, K) or (B, C, K, K) kernels as the compiled kernel reads them, (B, K*K, C)."""
    k = weight.shape[-1]
    return weight.reshape(samples, -1, k * k).transpose(1, 2).contiguous()


def _compiled_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], samples: int) -> Tensor:
    return cpu_extension.load().depthwise_conv2d(
        x, _taps(weight, samples), None if bias is None else bias.contiguous(),
        weight.shape[-1])


def _per_sample(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocked: bool) -> Tensor:
    """Channels-last depth-wise convolution of each sample with its own (C, K, K) kernels."""
    b, c, h, w = x.shape
    k = weight.shape[-1]
    if not blocked and h * w >= _PER_SAMPLE_ONEDNN_MIN_PIXELS:
        return torch.cat([
            F.conv2d(x[i:i + 1], weight[i].unsqueeze(1), bias, padding=k // 2, groups=c)
            for i in range(b)
        ])
    return _compiled_conv(x, weight, bias, b)


# The ``cpu_kernels`` backend as registered operators, with fake kernels (output layout =
# input layout) and autograd, so that torch.compile and torch.export keep them whole
# instead of tracing into the compiled kernels: forward and input gradient are the
# compiled kernels or oneDNN's channels-last depth-wise convolutions, as the module
# docstring says; the kernel gradient, slow in PyTorch, is the compiled kernel.
@torch.library.custom_op('mmdwnet::depthwise_conv2d', mutates_args=())
def _forward_cpu(input: Tensor, weight: Tensor, bias: Optional[Tensor], shared: bool) -> Tensor:
    k, c = weight.shape[-1], input.shape[1]  # input: channels-last (dispatch.py)
    blocked = _blocked(k, input.dtype)
    if not shared:
        out = _per_sample(input, weight, bias, blocked)
    elif (blocked and input.dtype == torch.float32
          and input.shape[2] * input.shape[3] < _SHARED_BLOCKED_MAX_PIXELS):
        out = _compiled_conv(input, weight, bias, 1)
    else:
        out = F.conv2d(input, weight, bias, padding=k // 2, groups=c)
    return out.contiguous(memory_format=torch.channels_last)  # as the fake kernel says


@_forward_cpu.register_fake
def _(input: Tensor, weight: Tensor, bias: Optional[Tensor], shared: bool) -> Tensor:
    return torch.empty_like(input, memory_format=torch.channels_last)


@torch.library.custom_op('mmdwnet::depthwise_conv2d_grad_weight', mutates_args=())
def _grad_weight_cpu(grad_output: Tensor, input: Tensor, weight: Tensor,
                     shared: bool) -> Tensor:
    per_sample = cpu_extension.load().depthwise_conv2d_weight_grad(
        grad_output, input, weight.shape[-1])
    if shared:
        per_sample = per_sample.sum(0, keepdim=True)
    return per_sample.transpose(1, 2).reshape(weight.shape).contiguous()


@_grad_weight_cpu.register_fake
def _(grad_output: Tensor, input: Tensor, weight: Tensor, shared: bool) -> Tensor:
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    input, weight, _, shared = inputs
    ctx.save_for_backward(input, weight)
    ctx.shared = shared


def _backward_cpu(ctx, grad_output: Tensor):
    x, weight = ctx.saved_tensors
    g = grad_output.contiguous(memory_format=torch.channels_last)
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        # the adjoint of a zero-padded odd-K correlation is the same correlation with the
        # kernel rotated by 180 degrees
        grad_input = _forward_cpu(g, weight.flip(-1, -2), None, ctx.shared)
    if ctx.needs_input_grad[1]:
        grad_weight = _grad_weight_cpu(g, x, weight, ctx.shared)
    if ctx.needs_input_grad[2]:  # False without a bias
        grad_bias = g.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None


_forward_cpu.register_autograd(_backward_cpu, setup_context=_setup_context)


def depthwise_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depth-wise convolution with 'same' zero padding.

    Args:
        input (Tensor): Features (B, C, H, W).
        weight (Tensor): Kernels shared by the batch, (C, 1, K, K) as in ``nn.Conv2d`` with
            ``groups=C``, or one set per sample, (B, C, K, K).
        bias (Tensor, optional): Per-channel bias (C). Defaults to None.

    Returns:
        Tensor: (B, C, H, W), in the memory format of ``input``. Under autocast every
        operand is cast to the autocast dtype first; float16/bfloat16 sums run in float32.
    """
    b, c = input.shape[:2]
    shared = weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == c
    if not shared and (weight.dim() != 4 or tuple(weight.shape[:2]) != (b, c)):
        raise ValueError('depthwise_conv2d: `weight` must be (C, 1, K, K) or (B, C, K, K) for '
                         f'input {tuple(input.shape)}, got {tuple(weight.shape)}')
    input, weight, bias = dispatch.autocast(input.device.type, input, weight, bias)
    backend = dispatch.choose(dispatch.make_call('depthwise_conv2d', input, weight, bias))
    if backend is dispatch.EXPORT:
        return export_form.depthwise_conv_standard(input, weight, bias, shared)
    if backend is dispatch.CPU_KERNELS:
        return _forward_cpu(input, weight, bias, shared)
    return like_input_layout(_reference(input, weight, bias, shared), input)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
    groups=channels)`` (same parameters and state-dict keys) computed by
    :func:`depthwise_conv2d`.

    Args:
        channels (int): Input and output channels.
        kernel_size (int): Odd kernel size K.
        bias (bool): Learn a per-channel bias. Defaults to True.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        return depthwise_conv2d(input, self.weight, self.bias)
