"""I-D-DW-Conv with its kernels predicted by a 1x1 convolution, as one operator.

``y = inhomogeneous_dwconv2d(x, (weight @ hidden + bias).view(B, G, K, K, H, W))``

The predicted kernels are G*K*K / C times larger than the features (16x in DWNet-T), so
they are never kept. On CPU the forward pass predicts and applies them in one compiled
kernel (``csrc/predicted_idwconv_cpu.cpp``): each tile of kernel values is predicted in
registers and applied at once, so the kernels never reach memory. Otherwise (kernel sizes
without a compiled kernel, the PyTorch fallback) it predicts and applies them a few
samples at a time (a chunk whose kernels fit in the CPU's cache, or a bounded slice of
GPU memory). The backward pass predicts them again from the small ``hidden`` map (C / 4
channels in DWNet) instead of saving them: on CPU in a fused kernel too, a row at a time
(except bfloat16 on CPUs with AVX-512 BF16, whose bfloat16 matrix products make the
chunked form faster), otherwise a chunk at a time. Autograd then stores only ``x`` and
``hidden``, which the layers around the operator keep anyway; the extra work is the
prediction once more, a matrix product with an inner size of C / 4.

Backends (:mod:`.dispatch`): ``cpu_kernels`` (the fused kernels, else the chunked form with
the compiled I-D-DW kernels), ``triton`` on CUDA (prediction by batched matrix products,
application and gradients by the Triton kernels of :mod:`.triton_idwconv`, which
``torch.compile`` sees) and ``pytorch`` (the chunked form) run inside the registered
operators ``mmdwnet::predicted_idwconv2d`` and ``..._backward``; ``export`` outside them.
In inference on CPU the fused kernel also applies the output's affine map and ReLU
(``predicted_idwconv2d.output_map``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_extension, dispatch, export_form, triton_idwconv
from .inhomogeneous_dwconv import _describe, grad_weight_impl, into
from .layout import empty_like_layout, like_input_layout

__all__ = ['predicted_idwconv2d']

# Bytes of predicted kernels (and, backward, of their gradient) that exist at once: on CPU
# a few MiB, which stay in the last-level cache between prediction and use; on GPUs, where
# each launch costs more, enough to bound the memory only.
CHUNK_BYTES = {'cpu': 8 * 2**20}
CHUNK_BYTES_OTHER = 2**30
# positions per tile of the kernel gradients in the backward products on CPU (a few MiB,
# which stay in the L2 cache)
_TILE = 512


def _chunks(input: Tensor, rows: int):
    """Sample ranges whose predicted kernels (``rows`` values per position) fit the
    device's chunk budget (at least one sample each)."""
    b, _, h, w = input.shape
    budget = CHUNK_BYTES.get(input.device.type, CHUNK_BYTES_OTHER)
    step = max(1, min(b, budget // max(1, rows * h * w * input.element_size())))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


def _predict(hidden: Tensor, weight: Tensor, bias: Tensor, groups: int, kernel_size: int,
             buffer: Tensor) -> Tensor:
    """(B, G, K, K, H, W) kernels from the (B, R, H, W) map, in the layout the operator
    reads (whatever the memory format of ``hidden``), written into ``buffer`` (at least B
    samples of (G*K*K, H*W)): one ``addmm`` per sample into memory the previous chunk
    used, which stays mapped and cached; at DWNet-T's stage-1 shape on CPU this took half
    the time of one ``baddbmm`` into a fresh tensor."""
    b, r, h, w = hidden.shape
    out = buffer[:b]
    for n in range(b):
        torch.addmm(bias[:, None], weight, hidden[n].reshape(r, h * w), out=out[n])
    return out.view(b, groups, kernel_size, kernel_size, h, w)


def _buffer(input: Tensor, weight: Tensor, chunks) -> Tensor:
    """Memory for the largest chunk's kernels."""
    samples = max((j - i for i, j in chunks), default=0)  # an empty batch has no chunks
    return weight.new_empty(samples, weight.shape[0], input.shape[2] * input.shape[3])


def _forward_impl(backend: str, input: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
                  kernel_size: int) -> Tensor:
    """The forward pass on ``backend`` (no autograd)."""
    if backend == 'triton':
        return _triton_forward(input, hidden, weight, bias, kernel_size)
    if backend == 'cpu_kernels':
        ops = cpu_extension.load()
        if ops.predicted_idwconv2d_applies(kernel_size, input.dtype, False):
            # prediction and application fused: the kernels never reach memory
            return ops.predicted_idwconv2d(input, hidden, weight, bias, kernel_size)
    groups = weight.shape[0] // kernel_size**2
    out = empty_like_layout(input)
    chunks = _chunks(input, weight.shape[0])
    buffer = _buffer(input, weight, chunks)
    for i, j in chunks:
        kernels = _predict(hidden[i:j], weight, bias, groups, kernel_size, buffer)
        into(backend, 'forward', input[i:j], kernels, out[i:j])
    return out


@torch.library.custom_op('mmdwnet::predicted_idwconv2d', mutates_args=())
def _forward(input: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
             kernel_size: int) -> Tensor:
    return dispatch.run('predicted_idwconv2d', _forward_impl,
                        input, hidden, weight, bias, kernel_size)


@_forward.register_fake
def _(input: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
      kernel_size: int) -> Tensor:
    return empty_like_layout(input)


def _backward_impl(backend: str, grad_output: Tensor, input: Tensor, hidden: Tensor,
                   weight: Tensor, bias: Tensor,
                   kernel_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four gradients on ``backend`` (no autograd)."""
    if backend == 'triton':
        return _triton_backward(grad_output, input, hidden, weight, bias, kernel_size)
    grad_input = empty_like_layout(input)
    grad_hidden = empty_like_layout(hidden)
    # the kernels' gradients are summed over samples and positions in float32 at least
    acc = torch.promote_types(weight.dtype, torch.float32)
    r = hidden.shape[1]
    # weight and bias gradients as one product: the bias sees an extra input row of ones
    grad_weight_bias = weight.new_zeros(weight.shape[0], r + 1, dtype=acc)
    if backend == 'cpu_kernels':
        ops = cpu_extension.load()
        if ops.predicted_idwconv2d_applies(kernel_size, input.dtype, True):
            # fused: one row of kernels and one of their gradient exist at a time
            ops.predicted_idwconv2d_backward(grad_output, input, hidden, weight, bias,
                                             kernel_size, grad_input, grad_hidden,
                                             grad_weight_bias)
            return _split(grad_weight_bias, weight, bias, grad_input, grad_hidden)
    groups = weight.shape[0] // kernel_size**2
    rows_last = hidden.is_contiguous(memory_format=torch.channels_last)
    chunks = _chunks(input, 2 * weight.shape[0])  # kernels and their gradient
    buffer = _buffer(input, weight, chunks)
    positions = input.shape[2] * input.shape[3]
    for i, j in chunks:
        b = j - i
        gy, x, hid = grad_output[i:j], input[i:j], hidden[i:j]
        kernels = _predict(hid, weight, bias, groups, kernel_size, buffer)
        into(backend, 'grad_input', gy, kernels, grad_input[i:j])
        grad_kernels = grad_weight_impl(backend, gy, x, groups,
                                        kernel_size).view(b, -1, positions)
        hid = torch.cat([hid.reshape(b, r, positions), hid.new_ones(b, 1, positions)], 1)
        grad_hid = (grad_hidden[i:j].permute(0, 2, 3, 1).view(b, positions, r) if rows_last
                    else grad_hidden[i:j].view(b, r, positions))
        # both products read the kernel gradients a tile of positions at a time, while the
        # tile is in cache: the large tensor comes from memory once, not twice
        tile_size = _TILE if input.device.type == 'cpu' else positions
        for n in range(b):
            for p0 in range(0, positions, tile_size):
                p1 = min(positions, p0 + tile_size)
                tile = grad_kernels[n, :, p0:p1]
                if rows_last:
                    torch.mm(tile.t(), weight, out=grad_hid[n, p0:p1])
                else:
                    grad_hid[n, :, p0:p1] = weight.t() @ tile
                grad_weight_bias.add_(tile @ hid[n, :, p0:p1].t())
    return _split(grad_weight_bias, weight, bias, grad_input, grad_hidden)


@torch.library.custom_op('mmdwnet::predicted_idwconv2d_backward', mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, hidden: Tensor, weight: Tensor,
                 bias: Tensor, kernel_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.run('predicted_idwconv2d.backward', _backward_impl, grad_output, input,
                        hidden, weight, bias, kernel_size)


def _split(grad_weight_bias: Tensor, weight: Tensor, bias: Tensor, grad_input: Tensor,
           grad_hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four gradients, weight and bias as separate tensors of their dtypes (outputs of
    a custom op may not alias each other)."""
    r = weight.shape[1]
    return (grad_input, grad_hidden, grad_weight_bias[:, :r].to(weight.dtype, copy=True),
            grad_weight_bias[:, r].to(bias.dtype, copy=True))


@_backward_op.register_fake
def _(grad_output, input, hidden, weight, bias, kernel_size):
    return (empty_like_layout(input), empty_like_layout(hidden), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output) -> None:
    input, hidden, weight, bias, kernel_size = inputs
    ctx.save_for_backward(input, hidden, weight, bias)
    ctx.kernel_size = kernel_size


def _backward(ctx, grad_output: Tensor):
    input, hidden, weight, bias = ctx.saved_tensors
    # gradients in the memory format of what they belong to (DWNet runs channels-last)
    if not (grad_output.is_contiguous()
            or grad_output.is_contiguous(memory_format=torch.channels_last)):
        grad_output = like_input_layout(grad_output.contiguous(), input)
    grads = _backward_op(grad_output, input, hidden, weight, bias, ctx.kernel_size)
    return (*grads, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def _predict_batched(hidden: Tensor, weight: Tensor, bias: Tensor, kernel_size: int,
                     groups: int) -> Tensor:
    """Contiguous (b, G, K, K, H, W) kernels from the (b, R, H, W) map, one batched
    product (the GPU form of :func:`_predict`)."""
    b, r, h, w = hidden.shape
    out = torch.baddbmm(bias[None, :, None], weight.expand(b, -1, -1),
                        hidden.reshape(b, r, h * w))
    return out.view(b, groups, kernel_size, kernel_size, h, w)


def _triton_forward(input: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
                    kernel_size: int) -> Tensor:
    groups = weight.shape[0] // kernel_size**2
    contiguous = input.contiguous()
    out = torch.empty_like(contiguous)
    for i, j in _chunks(input, weight.shape[0]):
        kernels = _predict_batched(hidden[i:j], weight, bias, kernel_size, groups)
        triton_idwconv.launch(contiguous, kernels, out, i)
    return like_input_layout(out, input)


def _triton_backward(grad_output: Tensor, input: Tensor, hidden: Tensor, weight: Tensor,
                     bias: Tensor, kernel_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    groups = weight.shape[0] // kernel_size**2
    layouts = input, hidden
    grad_output, input = grad_output.contiguous(), input.contiguous()
    b, r, h, w = hidden.shape
    grad_input = torch.empty_like(input)
    grad_hidden, grad_weight_bias = [], []
    for i, j in _chunks(input, 2 * weight.shape[0]):  # kernels and their gradient
        hid = hidden[i:j]
        kernels = _predict_batched(hid, weight, bias, kernel_size, groups)
        triton_idwconv.launch(grad_output, kernels, grad_input, i, transposed=True)
        grad_kernels = torch.empty_like(kernels)
        triton_idwconv.launch_weight_grad(grad_output, input, grad_kernels, i)
        grad_kernels = grad_kernels.view(j - i, -1, h * w)
        grad_hidden.append(torch.matmul(weight.t(), grad_kernels))
        # weight and bias gradients as one product: the bias sees an extra row of ones
        hid = torch.cat([hid.reshape(j - i, r, h * w), hid.new_ones(j - i, 1, h * w)], 1)
        grad_weight_bias.append(
            torch.bmm(grad_kernels, hid.transpose(1, 2)).sum(0, dtype=torch.float32))
    grad_hidden = torch.cat(grad_hidden).view(b, r, h, w)
    grad_weight_bias = torch.stack(grad_weight_bias).sum(0)
    return (like_input_layout(grad_input, layouts[0]),
            like_input_layout(grad_hidden, layouts[1]),
            grad_weight_bias[:, :r].to(weight.dtype, copy=True),
            grad_weight_bias[:, r].to(bias.dtype, copy=True))


dispatch.trace_triton_under_compile(_forward, 'predicted_idwconv2d', _forward_impl)
dispatch.trace_triton_under_compile(_backward_op, 'predicted_idwconv2d.backward',
                                    _backward_impl)


def _epilogue(out: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
              relu: bool) -> Tensor:
    """``relu(out * scale + shift)`` per channel, each part where asked for."""
    if scale is not None:
        out = torch.addcmul(shift.to(out.dtype).view(-1, 1, 1), out,
                            scale.to(out.dtype).view(-1, 1, 1))
    return F.relu(out) if relu else out


def predicted_idwconv2d(input: Tensor,
                        hidden: Tensor,
                        weight: Tensor,
                        bias: Tensor,
                        kernel_size: int,
                        scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None,
                        relu: bool = False) -> Tensor:
    """Inhomogeneous dynamic depth-wise convolution whose kernels a 1x1 convolution
    predicts from ``hidden``; the kernels are never stored (see the module docstring).

    Args:
        input (Tensor): Features (B, C, H, W).
        hidden (Tensor): The predictor's input (B, R, H, W).
        weight (Tensor): 1x1 convolution weight (G*K*K, R), rows ordered (g, i, j).
        bias (Tensor): Its bias (G*K*K).
        kernel_size (int): K.
        scale (Tensor, optional): Per-channel factors (C) applied to the output, with
            ``shift``: e.g. an inference BatchNorm after the operator. Defaults to None.
        shift (Tensor, optional): Per-channel offsets (C) added after ``scale``.
            Defaults to None.
        relu (bool): Apply a ReLU last. Defaults to False.

    Returns:
        Tensor: (B, C, H, W) in the memory format of ``input``, equal to
        :func:`mmdwnet.ops.inhomogeneous_dwconv2d` applied to the predicted kernels
        (then ``relu(y * scale + shift)`` where asked for). Under autocast every operand
        is cast to the autocast dtype, so the kernels are predicted from operands in that
        dtype too; float16/bfloat16 sums run in float32 (the fused CPU kernel keeps the
        predicted kernel values in float32; the other paths round them to the dtype). In
        inference on CPU the fused kernel applies ``scale``, ``shift`` and the ReLU to
        its float32 sums before it rounds them: no extra pass over the output.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError('predicted_idwconv2d: `input` must be a 4-D (B, C, H, W) tensor, '
                         f'got {_describe(input)}')
    if not isinstance(hidden, Tensor) or hidden.dim() != 4 or (
            hidden.shape[0], *hidden.shape[2:]) != (input.shape[0], *input.shape[2:]):
        raise ValueError('predicted_idwconv2d: `hidden` must be a 4-D (B, R, H, W) tensor '
                         f'matching `input` {tuple(input.shape)}, got {_describe(hidden)}')
    rows = kernel_size**2
    if (weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] % rows
            or input.shape[1] % (weight.shape[0] // rows) or bias.shape != weight.shape[:1]):
        raise ValueError(
            f'predicted_idwconv2d: `weight` must be (G*K*K, R) = (G*{rows}, '
            f'{hidden.shape[1]}) with G dividing the {input.shape[1]} channels and `bias` '
            f'(G*K*K), got {tuple(weight.shape)} and {tuple(bias.shape)}')
    if (scale is None) != (shift is None) or scale is not None and not (
            isinstance(scale, Tensor) and isinstance(shift, Tensor)
            and scale.shape == shift.shape == input.shape[1:2]):
        raise ValueError('predicted_idwconv2d: `scale` and `shift` must both be given as '
                         f'({input.shape[1]},) tensors or both be None, got '
                         f'{_describe(scale)} and {_describe(shift)}')
    input, hidden, weight, bias = dispatch.autocast(input.device.type, input, hidden, weight,
                                                    bias)
    if len({t.dtype for t in (input, hidden, weight, bias)}) > 1:
        raise TypeError('predicted_idwconv2d: all operands must have the same dtype, got '
                        f'{input.dtype}, {hidden.dtype}, {weight.dtype} and {bias.dtype}')
    operands = (input, hidden, weight, bias)
    if dispatch.choose(dispatch.make_call('predicted_idwconv2d', *operands)) is dispatch.EXPORT:
        return _epilogue(
            export_form.predicted_idwconv_shift_add(input, hidden, weight, bias, kernel_size),
            scale, shift, relu)
    if scale is not None or relu:
        call = dispatch.make_call('predicted_idwconv2d.output_map', *operands, scale, shift,
                                  kernel_size=kernel_size, dtype=input.dtype)
        if dispatch.choose(call) is dispatch.CPU_KERNELS:
            acc = torch.promote_types(input.dtype, torch.float32)  # the kernel's sums
            affine = (None, None) if scale is None else (scale.to(acc), shift.to(acc))
            return cpu_extension.load().predicted_idwconv2d(input, hidden, weight, bias,
                                                            kernel_size, *affine, relu)
    return _epilogue(_forward(input, hidden, weight, bias, kernel_size), scale, shift, relu)
