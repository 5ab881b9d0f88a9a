"""Triton kernels of the inhomogeneous dynamic depth-wise convolution for CUDA.

One program computes a block of positions of one (sample, group) plane for all the group's
channels: forward ``y[c, p] = sum_k w[k, p] * x[c, p + d_k]``, the input gradient
``gx[c, p] = sum_k w[k, p - d_k] * gy[c, p - d_k]`` and the kernel gradient
``gw[k, p] = sum_c gy[c, p] * x[c, p + d_k]``, with zeros outside the map, accumulating in
float32 for every input dtype. Nothing is unfolded or padded, so memory is the output only.

They are the ``triton`` backend of the dynamic operators (:mod:`.dispatch`): used for CUDA
tensors when Triton is importable (it ships with the CUDA builds of torch);
``MMDWNET_TRITON=0`` or any failure falls back to the PyTorch implementation. They are
checked against that implementation on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``), so CI without a GPU still tests their logic.

They launch through ``torch.library.wrap_triton``: eagerly the kernels run directly, while
``torch.compile`` traces the registered operators into the kernels themselves
(:func:`.dispatch.trace_triton_under_compile`), so that Inductor sees and schedules the
Triton code instead of an opaque call (``torch.export`` keeps them as named operators, as
PyTorch intends for exported programs).
"""
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None

BLOCK = 128


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, on CPU
    tensors), as the tests do without a GPU."""
    return os.environ.get('TRITON_INTERPRET') == '1'


def shipped_with_torch() -> bool:
    """Whether the installed torch declares Triton a dependency on this platform (its
    Linux wheels do, CPU-only and CUDA alike), so that Triton should be importable."""
    from importlib import metadata
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - a bare environment: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    try:
        requires = metadata.requires('torch') or []
    except metadata.PackageNotFoundError:  # pragma: no cover - torch built from source
        return False
    for line in requires:
        req = Requirement(line)
        if req.name in ('triton', 'pytorch-triton') and (
                req.marker is None or req.marker.evaluate({'extra': ''})):
            return True
    return False


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, y_ptr, H, W, PLANE0, CPG: tl.constexpr,
                        K: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
        # (sample, group) plane ``bg`` of the kernels is plane ``PLANE0 + bg`` of the maps
        bg = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        plane = H * W
        inside = offs < plane
        h = offs // W
        w = offs % W
        pad = K // 2
        x_base = x_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        w_base = w_ptr + bg.to(tl.int64) * K * K * plane
        y_base = y_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        for c in tl.static_range(CPG):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for i in tl.static_range(K):
                for j in tl.static_range(K):
                    if TRANSPOSED:  # gather form of the input gradient
                        hh = h - (i - pad)
                        ww = w - (j - pad)
                    else:
                        hh = h + (i - pad)
                        ww = w + (j - pad)
                    valid = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                    src = hh * W + ww
                    xv = tl.load(x_base + c * plane + src, mask=valid, other=0.)
                    if TRANSPOSED:
                        wv = tl.load(w_base + (i * K + j) * plane + src, mask=valid, other=0.)
                    else:
                        wv = tl.load(w_base + (i * K + j) * plane + offs, mask=valid, other=0.)
                    acc += xv.to(tl.float32) * wv.to(tl.float32)
            tl.store(y_base + c * plane + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _weight_grad_kernel(gy_ptr, x_ptr, gw_ptr, H, W, PLANE0, CPG: tl.constexpr,
                            K: tl.constexpr, BLOCK: tl.constexpr):
        bg = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        plane = H * W
        inside = offs < plane
        h = offs // W
        w = offs % W
        pad = K // 2
        x_base = x_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        gy_base = gy_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        gw_base = gw_ptr + bg.to(tl.int64) * K * K * plane
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                hh = h + (i - pad)
                ww = w + (j - pad)
                valid = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for c in tl.static_range(CPG):
                    g = tl.load(gy_base + c * plane + offs, mask=valid, other=0.)
                    xv = tl.load(x_base + c * plane + hh * W + ww, mask=valid, other=0.)
                    acc += g.to(tl.float32) * xv.to(tl.float32)
                tl.store(gw_base + (i * K + j) * plane + offs,
                         acc.to(gw_ptr.dtype.element_ty), mask=inside)


def _grid(b: int, groups: int, h: int, w: int):
    return (b * groups, triton.cdiv(h * w, BLOCK))


def launch(src: Tensor, kernels: Tensor, out: Tensor, sample0: int = 0,
           transposed: bool = False) -> None:
    """Write samples ``sample0 .. sample0 + len(kernels)`` of ``out`` from those of ``src``
    (contiguous (B, C, H, W) maps) and the contiguous (b, G, K, K, H, W) ``kernels``:
    the operator, or with ``transposed`` its input gradient. Launched through
    ``wrap_triton``, so that inside a ``triton_op`` the compiler sees the kernel."""
    b, groups, k = kernels.shape[:3]
    c, h, w = src.shape[1:]
    kernel = torch.library.wrap_triton(_forward_kernel)
    kernel[_grid(b, groups, h, w)](src, kernels, out, h, w, sample0 * groups,
                                   CPG=c // groups, K=k, TRANSPOSED=transposed, BLOCK=BLOCK)


def launch_weight_grad(grad_output: Tensor, input: Tensor, out: Tensor,
                       sample0: int = 0) -> None:
    """Write ``out`` (contiguous (b, G, K, K, H, W)), the kernel gradient of samples
    ``sample0 .. sample0 + b`` of the contiguous maps ``grad_output`` and ``input``."""
    b, groups, k = out.shape[:3]
    c, h, w = input.shape[1:]
    kernel = torch.library.wrap_triton(_weight_grad_kernel)
    kernel[_grid(b, groups, h, w)](grad_output, input, out, h, w, sample0 * groups,
                                   CPG=c // groups, K=k, BLOCK=BLOCK)


def forward(input: Tensor, weight: Tensor, transposed: bool = False) -> Tensor:
    """``transposed=False``: the operator; ``True``: its input gradient, with ``input``
    the output gradient."""
    input, weight = input.contiguous(), weight.contiguous()
    out = torch.empty_like(input)
    launch(input, weight, out, transposed=transposed)
    return out


def grad_input(grad_output: Tensor, weight: Tensor) -> Tensor:
    return forward(grad_output, weight, transposed=True)


def weight_grad(grad_output: Tensor, input: Tensor, groups: int, kernel_size: int) -> Tensor:
    grad_output, input = grad_output.contiguous(), input.contiguous()
    b, c, h, w = input.shape
    out = input.new_empty(b, groups, kernel_size, kernel_size, h, w)
    launch_weight_grad(grad_output, input, out)
    return out
