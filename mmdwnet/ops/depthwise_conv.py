"""Depth-wise K x K convolution (odd K, zero padding K // 2, stride 1) with kernels shared
by the batch (static DW-Conv) or one set per sample (homogeneous dynamic D-DW-Conv).

On CPU, for float32/float64 channels-last features (the layout DWNet's blocks run in), it
uses the compiled kernels of ``csrc/depthwise_conv_cpu.cpp``: every multiply-add is a vector
operation along the contiguous channel axis, forward and backward, and per-sample kernels
need no reshaping of the batch into one grouped convolution. Measured on the paper's stage
shapes it is several times faster than PyTorch's channels-last depth-wise convolution on
CPU (see tools/benchmark.py). Elsewhere - GPU, other dtypes, even K, or when the extension
cannot be built - it is ``F.conv2d`` with ``groups=C`` (per-sample kernels: one grouped
convolution over the batch folded into channels).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_extension

__all__ = ['depthwise_conv2d', 'DepthwiseConv2d']


def _reference(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    b, c, h, w = input.shape
    k = weight.shape[-1]
    if weight.shape[1] == 1 and weight.shape[0] == c:
        return F.conv2d(input, weight, bias, padding=k // 2, groups=c)
    out = F.conv2d(input.reshape(1, b * c, h, w), weight.reshape(b * c, 1, k, k),
                   padding=k // 2, groups=b * c).reshape(b, c, h, w)
    return out if bias is None else out + bias.view(1, c, 1, 1)


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """Static kernels: forward and input gradient are oneDNN's channels-last depth-wise
    convolutions (fast on CPU); the kernel gradient, slow in PyTorch, is the compiled
    kernel. Per-sample kernels: all three are compiled kernels."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                shared: bool) -> Tensor:
        ops = cpu_extension.load()
        k = weight.shape[-1]
        c = input.shape[1]
        x = input.contiguous(memory_format=torch.channels_last)
        ctx.kernel_size, ctx.shared, ctx.has_bias = k, shared, bias is not None
        ctx.weight_shape = weight.shape
        if shared:
            ctx.save_for_backward(x, weight)
            return F.conv2d(x, weight, bias, padding=k // 2, groups=c)
        # (B, C, K, K) per sample -> (B, K*K, C), the layout of the compiled kernels
        taps = weight.reshape(weight.shape[0], c, k * k).transpose(1, 2).contiguous()
        ctx.save_for_backward(x, taps)
        return ops.depthwise_conv2d(x, taps, None if bias is None else bias.contiguous(), k)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        ops = cpu_extension.load()
        x, kernels = ctx.saved_tensors
        k, c = ctx.kernel_size, x.shape[1]
        g = grad_output.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the adjoint of a zero-padded odd-K correlation is the same correlation with
            # the kernel rotated by 180 degrees
            if ctx.shared:
                grad_input = F.conv2d(g, kernels.flip(-1, -2), None, padding=k // 2, groups=c)
            else:
                grad_input = ops.depthwise_conv2d(g, kernels.flip(1).contiguous(), None, k)
        if ctx.needs_input_grad[1]:
            per_sample = ops.depthwise_conv2d_weight_grad(g, x, k)  # (B, K*K, C)
            if ctx.shared:
                per_sample = per_sample.sum(0, keepdim=True)
            grad_weight = per_sample.transpose(1, 2).reshape(ctx.weight_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None


def _use_compiled(input: Tensor, weight: Tensor) -> bool:
    return (input.device.type == 'cpu' and input.dtype in (torch.float32, torch.float64)
            and weight.dtype == input.dtype and weight.shape[-1] % 2 == 1
            and weight.shape[-1] == weight.shape[-2]
            and input.is_contiguous(memory_format=torch.channels_last)
            # tracers (FLOP counting) see the standard convolution
            and not torch.jit.is_tracing() and cpu_extension.load() is not None)


def depthwise_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depth-wise convolution with 'same' zero padding.

    Args:
        input (Tensor): Features (B, C, H, W).
        weight (Tensor): Kernels shared by the batch, (C, 1, K, K) as in ``nn.Conv2d`` with
            ``groups=C``, or one set per sample, (B, C, K, K).
        bias (Tensor, optional): Per-channel bias (C). Defaults to None.

    Returns:
        Tensor: (B, C, H, W), channels-last on the compiled CPU path.
    """
    b, c = input.shape[:2]
    shared = weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == c
    if not shared and (weight.dim() != 4 or tuple(weight.shape[:2]) != (b, c)):
        raise ValueError('depthwise_conv2d: `weight` must be (C, 1, K, K) or (B, C, K, K) for '
                         f'input {tuple(input.shape)}, got {tuple(weight.shape)}')
    if _use_compiled(input, weight):
        return _DepthwiseConv2dCPU.apply(input, weight, bias, shared)
    return _reference(input, weight, bias)


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
