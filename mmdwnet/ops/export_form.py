"""The operators in standard graph operations, for exporting models out of PyTorch.

Inside :func:`export_mode`, :func:`~mmdwnet.ops.inhomogeneous_dwconv2d`,
:func:`~mmdwnet.ops.predicted_idwconv2d` and :func:`~mmdwnet.ops.depthwise_conv2d` compute
with the functions below instead of their fast kernels, so that an exporter (ONNX,
``torch.export``) records only operations every backend has: padding, slicing,
multiplication, addition, matrix products and convolutions. No ``Unfold``/``Im2Col``: the
dynamic operators pad the input once, stack its K row shifts and add up the K column
shifts of that stack, each weighted by the matching column of the kernels
(:func:`idwconv_shift_add`); the largest tensor built is K times the input, less than the
inhomogeneous operator's kernels.
Outside the context nothing changes: the PyTorch forward keeps its fast kernels, at the
cost of one flag check per call.
"""
import threading
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    'export_mode', 'in_export_mode', 'tracing_shapes', 'same_padding', 'idwconv_shift_add',
    'predicted_idwconv_shift_add', 'depthwise_conv_standard', 'adaptive_avg_pool2d_standard',
    'ExportableAdaptiveAvgPool2d'
]

_state = threading.local()


@contextmanager
def export_mode():
    """Within this context mmdwnet's operators use their export forms."""
    previous = in_export_mode()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def in_export_mode() -> bool:
    return getattr(_state, 'active', False)


def tracing_shapes() -> bool:
    """Whether sizes may be symbolic here (export mode, ``torch.export``,
    ``torch.compile``): size-dependent padding must then be written as operations, not
    decided in Python for the example's size."""
    return in_export_mode() or torch.compiler.is_compiling()


def same_padding(x: Tensor, kernel_size: int) -> Tensor:
    """Zero padding that keeps the map size for any K: K // 2 rows (columns) before and
    K - 1 - K // 2 after, so kernel tap ``i`` reads offset ``i - K // 2``."""
    before, after = kernel_size // 2, kernel_size - 1 - kernel_size // 2
    return F.pad(x, (before, after, before, after))


def idwconv_shift_add(input: Tensor, weight: Tensor) -> Tensor:
    """Inhomogeneous dynamic depth-wise convolution as pad, slice, multiply and add.

    The K row shifts of the padded input are stacked once, (B, G, C/G, K, H, W + K - 1):
    K times the input, less than the kernels (G*K*K/C times the input, 16x in DWNet-T).
    Each of the K column shifts of that stack is then weighted by the matching column of
    the kernels and summed over the rows. That is about 4K operations per layer where
    one shifted slice per tap took 4K*K: the exporter took a third of the time on
    I-D-DW-T (17 -> 6 s on 2 cores), and ONNX Runtime ran the graph at the same speed
    within noise (docs/deployment.md). All slices have constant bounds (negative ends),
    so no size arithmetic enters the graph.

    Args:
        input (Tensor): (B, C, H, W).
        weight (Tensor): Per-position kernels (B, G, K, K, H, W), each shared by the C / G
            consecutive channels of a group; or (B, G, K, K, 1, 1), one per sample.

    Returns:
        Tensor: (B, C, H, W).
    """
    b, c, h, w = input.shape
    groups, k = weight.shape[1], weight.shape[2]
    padded = same_padding(input, k).reshape(b, groups, c // groups, h + k - 1, w + k - 1)
    # tap (i, j) reads padded[..., i:i + h, j:j + w]; the end i + h is i - (K - 1)
    rows = torch.stack([padded[:, :, :, i:i - (k - 1) or None] for i in range(k)], dim=3)
    out = None
    for j in range(k):
        term = (rows[..., j:j - (k - 1) or None] * weight[:, :, None, :, j]).sum(3)
        out = term if out is None else out + term
    return out.reshape(b, c, h, w)


def predicted_idwconv_shift_add(input: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
                                kernel_size: int) -> Tensor:
    """:func:`~mmdwnet.ops.predicted_idwconv2d`: the kernels predicted by a 1x1
    convolution of ``hidden`` with ``weight`` (G*K*K, R) and ``bias``, then applied by
    :func:`idwconv_shift_add`."""
    b, _, h, w = input.shape
    kernels = F.conv2d(hidden, weight[:, :, None, None], bias)
    return idwconv_shift_add(
        input, kernels.reshape(b, -1, kernel_size, kernel_size, h, w))


def depthwise_conv_standard(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                            shared: bool) -> Tensor:
    """Depth-wise convolution with 'same' padding: kernels shared by the batch
    (C, 1, K, K) as one grouped convolution; per-sample kernels (B, C, K, K) by
    :func:`idwconv_shift_add` with one group per channel and the same kernel at every
    position (a convolution with B*C groups would fix the batch size in the graph, as
    ONNX's ``group`` is an attribute)."""
    if shared:
        return F.conv2d(same_padding(input, weight.shape[-1]), weight, bias,
                        groups=input.shape[1])
    out = idwconv_shift_add(input, weight[..., None, None])
    return out if bias is None else out + bias[:, None, None]


def _pooling_matrix(length, size: int, like: Tensor) -> Tensor:
    """(size, length): row i averages the input positions [floor(i * L / S),
    ceil((i + 1) * L / S)), PyTorch's adaptive pooling bins."""
    i = torch.arange(size, device=like.device)
    start = torch.div(i * length, size, rounding_mode='floor')
    end = torch.div((i + 1) * length + size - 1, size, rounding_mode='floor')
    j = torch.arange(length, device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d_standard(input: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d`` as two matrix products with averaging matrices built from
    the input's size in the graph (ONNX has no adaptive pooling: its exporter handles only
    sizes known at export time that the output size divides)."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = input.shape[-2:]
    out_h, out_w = out_h or h, out_w or w  # None keeps that size
    rows = _pooling_matrix(h, out_h, input)
    cols = _pooling_matrix(w, out_w, input)
    return torch.matmul(torch.matmul(rows, input), cols.transpose(0, 1))


class ExportableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that uses :func:`adaptive_avg_pool2d_standard` in export
    mode (swapped in by :func:`mmdwnet.apis.export.prepare_for_export`, e.g. for UPerNet's
    pyramid pooling)."""

    def forward(self, input: Tensor) -> Tensor:
        if in_export_mode() and self.output_size not in (1, (1, 1)):
            return adaptive_avg_pool2d_standard(input, self.output_size)
        return super().forward(input)  # output size 1: ONNX's GlobalAveragePool
