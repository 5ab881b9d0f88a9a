"""Inhomogeneous dynamic depth-wise convolution (I-D-DW-Conv, "involution").

``y[b, c, h, w] = sum_{i,j} w[b, c // (C / G), i, j, h, w]
* x[b, c, h + i - K // 2, w + j - K // 2]``, with zeros outside the feature map, for
weights ``w`` of shape (B, G, K, K, H, W).

The reference implementation of the paper ships this as a CUDA-only CuPy kernel; the usual
portable rewrite unfolds the input into a K*K-times larger tensor. Here the operator and
its two gradients are registered operators (``mmdwnet::inhomogeneous_dwconv2d``,
``..._grad_input``, ``..._grad_weight``), so that tracers, ``torch.compile`` and FLOP
counters see one named operator, whose backends (:mod:`.dispatch`) are:

- ``cpu_kernels``: compiled kernels (``csrc/inhomogeneous_dwconv_cpu.cpp``): one task per
  (sample, group) plane streams that plane's K*K kernel maps once while the group's
  channels stay in cache; float16/bfloat16 operands are read as they are and summed in
  float32;
- ``triton``: the Triton kernels of :mod:`.triton_idwconv` on CUDA;
- ``pytorch``: the sum runs over the K*K kernel offsets, each one an in-place
  multiply-add of the overlapping parts of the output and the shifted input (no padding,
  no unfold), so the forward pass allocates its output and, for float16/bfloat16, float32
  buffers for a sixteenth of it at a time; the backward pass is written out by hand for
  the same reason;
- ``export``, outside the registered operator: :func:`.export_form.idwconv_shift_add`.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_extension, dispatch, export_form, triton_idwconv
from .layout import empty_like_layout, like_input_layout

__all__ = ['inhomogeneous_dwconv2d']


def _offsets(kernel_size: int, height: int, width: int):
    """Yield ``(i, j, dy, dx, (h0, h1), (w0, w1))`` for every kernel offset whose
    shifted window overlaps the map; ``[h0:h1, w0:w1]`` is the output region."""
    pad = kernel_size // 2
    for i in range(kernel_size):
        dy = i - pad
        h0, h1 = max(0, -dy), min(height, height - dy)
        if h0 >= h1:
            continue
        for j in range(kernel_size):
            dx = j - pad
            w0, w1 = max(0, -dx), min(width, width - dx)
            if w0 >= w1:
                continue
            yield i, j, dy, dx, (h0, h1), (w0, w1)


def _block_planes(input: Tensor, groups: int, accumulate: bool) -> int:
    """How many (sample, group) planes are processed together.

    On CPU one sample, so that its maps stay in cache over the K*K passes; on GPU the whole
    batch. When float16/bfloat16 operands need a float32 accumulator (and float32 copies of
    the operands), at most a sixteenth of the batch's planes.
    """
    batch = input.shape[0]
    planes = groups if input.device.type == 'cpu' else batch * groups
    if accumulate:
        planes = max(1, min(planes, batch * groups // 16))
    return planes


def _blocks(batch: int, groups: int, planes: int):
    """Index pairs (samples, groups) covering the batch in blocks of about ``planes``."""
    if planes >= groups:
        step = planes // groups
        return [(slice(n, n + step), slice(None)) for n in range(0, batch, step)]
    return [(slice(n, n + 1), slice(g, g + planes)) for n in range(batch)
            for g in range(0, groups, planes)]


def _shift_accumulate(src: Tensor, weight: Tensor, transposed: bool,
                      planes: Optional[int] = None) -> Tensor:
    """``out[..., p] = sum_k w_k[p] * src[..., p + d_k]`` (forward), or the transposed sum
    ``out[..., p + d_k] += w_k[p] * src[..., p]`` (gradient of the input). float16/bfloat16
    operands accumulate in float32."""
    b, c, height, width = src.shape
    groups, kernel_size = weight.shape[1], weight.shape[2]
    out = torch.empty((b, c, height, width), dtype=src.dtype, device=src.device)
    out5 = out.view(b, groups, c // groups, height, width)
    src5 = src.reshape(b, groups, c // groups, height, width)
    acc_dtype = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    offsets = list(_offsets(kernel_size, height, width))
    if planes is None:
        planes = _block_planes(src, groups, accumulate=acc_dtype != src.dtype)
    for samples, group_block in _blocks(b, groups, planes):
        # mixed-dtype multiply-adds would cast their operands into hidden temporaries at
        # every offset; cast the block's input once and each offset's kernels instead
        x = src5[samples, group_block].to(acc_dtype)
        w = weight[samples, group_block]
        y = out5[samples, group_block] if acc_dtype == src.dtype else x.new_empty(x.shape)
        y.zero_()
        for i, j, dy, dx, (h0, h1), (w0, w1) in offsets:
            shifted = (..., slice(h0 + dy, h1 + dy), slice(w0 + dx, w1 + dx))
            region = (..., slice(h0, h1), slice(w0, w1))
            dst, srcs = (shifted, region) if transposed else (region, shifted)
            y[dst].addcmul_(w[:, :, i, j, None, h0:h1, w0:w1].to(acc_dtype), x[srcs])
        if acc_dtype != src.dtype:
            out5[samples, group_block] = y
    return out


def _compiled_call(name: str, *args):
    """The compiled CPU kernel ``name`` on ``args`` (feature maps may be channels-last,
    the (B, G, K, K, H, W) kernels are made contiguous)."""
    return getattr(cpu_extension.load(), name)(*(
        a.contiguous() if isinstance(a, Tensor) and a.dim() == 6 else a for a in args))


def forward_impl(backend: str, input: Tensor, weight: Tensor) -> Tensor:
    """The forward pass on ``backend`` (no autograd), in the memory format of ``input``
    (the compiled kernels read and write channels-last maps as they are; the other
    backends compute in NCHW)."""
    if backend == 'cpu_kernels':
        out = _compiled_call('inhomogeneous_dwconv2d', input, weight)
    elif backend == 'triton':
        out = triton_idwconv.forward(input, weight)
    else:
        out = _shift_accumulate(input, weight, transposed=False)
    return like_input_layout(out, input)


def grad_input_impl(backend: str, grad_output: Tensor, weight: Tensor) -> Tensor:
    """The gradient w.r.t. the input on ``backend`` (no autograd), in the memory format of
    ``grad_output``."""
    if backend == 'cpu_kernels':
        out = _compiled_call('inhomogeneous_dwconv2d_grad_input', grad_output, weight)
    elif backend == 'triton':
        out = triton_idwconv.grad_input(grad_output, weight)
    else:
        out = _shift_accumulate(grad_output, weight, transposed=True)
    return like_input_layout(out, grad_output)


def into(backend: str, kind: str, src: Tensor, weight: Tensor, out: Tensor) -> None:
    """``out[...] = forward_impl(backend, src, weight)`` (``kind='forward'``) or
    ``grad_input_impl`` (``'grad_input'``), written in place by the compiled kernels
    (``out`` NCHW or channels-last): no temporary, no copy."""
    if backend == 'cpu_kernels' and (out.is_contiguous()
                                     or out.is_contiguous(memory_format=torch.channels_last)):
        name = 'inhomogeneous_dwconv2d' + ('_into' if kind == 'forward' else
                                           '_grad_input_into')
        getattr(cpu_extension.load(), name)(src, weight.contiguous(), out)
    else:
        impl = forward_impl if kind == 'forward' else grad_input_impl
        out.copy_(impl(backend, src, weight))


def grad_weight_impl(backend: str, grad_output: Tensor, input: Tensor, groups: int,
                     kernel_size: int) -> Tensor:
    """The gradient w.r.t. the (B, G, K, K, H, W) kernels on ``backend`` (no autograd)."""
    if backend == 'cpu_kernels':
        return _compiled_call('inhomogeneous_dwconv2d_grad_weight', grad_output, input,
                              groups, kernel_size)
    if backend == 'triton':
        return triton_idwconv.weight_grad(grad_output, input, groups, kernel_size)
    b, c, height, width = input.shape
    grad_weight = grad_output.new_zeros(b, groups, kernel_size, kernel_size, height, width)
    x5 = input.reshape(b, groups, c // groups, height, width)
    gy5 = grad_output.reshape(b, groups, c // groups, height, width)
    offsets = list(_offsets(kernel_size, height, width))
    for samples, group_block in _blocks(b, groups, _block_planes(input, groups, False)):
        x, gy = x5[samples, group_block], gy5[samples, group_block]
        gw = grad_weight[samples, group_block]
        for i, j, dy, dx, (h0, h1), (w0, w1) in offsets:
            gw[:, :, i, j, h0:h1, w0:w1] = (
                gy[..., h0:h1, w0:w1] * x[..., h0 + dy:h1 + dy, w0 + dx:w1 + dx]).sum(2)
    return grad_weight


@torch.library.custom_op('mmdwnet::inhomogeneous_dwconv2d', mutates_args=())
def _forward(input: Tensor, weight: Tensor) -> Tensor:
    return dispatch.run('inhomogeneous_dwconv2d', forward_impl, input, weight)


def _like_first(first: Tensor, weight: Tensor) -> Tensor:
    return empty_like_layout(first)


_forward.register_fake(_like_first)


@torch.library.custom_op('mmdwnet::inhomogeneous_dwconv2d_grad_input', mutates_args=())
def _grad_input(grad_output: Tensor, weight: Tensor) -> Tensor:
    return dispatch.run('inhomogeneous_dwconv2d.grad_input', grad_input_impl, grad_output,
                        weight)


_grad_input.register_fake(_like_first)


@torch.library.custom_op('mmdwnet::inhomogeneous_dwconv2d_grad_weight', mutates_args=())
def _grad_weight(grad_output: Tensor, input: Tensor, groups: int,
                 kernel_size: int) -> Tensor:
    return dispatch.run('inhomogeneous_dwconv2d.grad_weight', grad_weight_impl, grad_output,
                        input, groups, kernel_size)


@_grad_weight.register_fake
def _(grad_output: Tensor, input: Tensor, groups: int, kernel_size: int) -> Tensor:
    b, _, height, width = input.shape
    return input.new_empty(b, groups, kernel_size, kernel_size, height, width)


for _op, _name, _impl in [(_forward, '', forward_impl),
                          (_grad_input, '.grad_input', grad_input_impl),
                          (_grad_weight, '.grad_weight', grad_weight_impl)]:
    dispatch.trace_triton_under_compile(_op, 'inhomogeneous_dwconv2d' + _name, _impl)


def _setup_context(ctx, inputs: Tuple[Tensor, Tensor], output: Tensor) -> None:
    input, weight = inputs
    ctx.save_for_backward(input, weight)


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = _grad_input(grad_output, weight)
    if ctx.needs_input_grad[1]:
        grad_weight = _grad_weight(grad_output, input, weight.shape[1], weight.shape[2])
    return grad_input, grad_weight


_forward.register_autograd(_backward, setup_context=_setup_context)


def inhomogeneous_dwconv2d(input: Tensor, weight: Tensor) -> Tensor:
    """Inhomogeneous dynamic depth-wise convolution with zero padding.

    Args:
        input (Tensor): Features of shape (B, C, H, W).
        weight (Tensor): Per-position kernels of shape (B, G, K, K, H, W), shared by
            the C / G consecutive channels of each group. Kernel index ``i`` reads row
            ``h + i - K // 2`` (so an even K reaches one row further up than down).

    Returns:
        Tensor: Output of shape (B, C, H, W), in the memory format of ``input``.

    Under autocast both operands are cast to the autocast dtype; float16/bfloat16 operands
    accumulate in float32 and the result is rounded once.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError('inhomogeneous_dwconv2d: `input` must be a 4-D (B, C, H, W) '
                         f'tensor, got {_describe(input)}')
    if not isinstance(weight, Tensor) or weight.dim() != 6:
        raise ValueError('inhomogeneous_dwconv2d: `weight` must be a 6-D (B, G, K, K, H, W) '
                         f'tensor, got {_describe(weight)}')
    b, c, h, w = input.shape
    wb, groups, kh, kw, wh, ww = weight.shape
    if (wb, wh, ww) != (b, h, w) or kh != kw or groups == 0 or c % groups:
        raise ValueError(
            'inhomogeneous_dwconv2d: `weight` of shape (B, G, K, K, H, W) must match `input` '
            f'(B, C, H, W) = {tuple(input.shape)} with G dividing C, '
            f'got weight shape {tuple(weight.shape)}')
    input, weight = dispatch.autocast(input.device.type, input, weight)
    if input.dtype != weight.dtype:
        raise TypeError('inhomogeneous_dwconv2d: `input` and `weight` must have the same '
                        f'dtype, got {input.dtype} and {weight.dtype}')
    call = dispatch.make_call('inhomogeneous_dwconv2d', input, weight)
    if dispatch.choose(call) is dispatch.EXPORT:
        return export_form.idwconv_shift_add(input, weight)
    return _forward(input, weight)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f'a tensor of shape {tuple(x.shape)}'
    return f'{type(x).__name__}'
