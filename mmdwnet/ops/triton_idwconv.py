"""Triton kernels of the inhomogeneous dynamic depth-wise convolution for CUDA.

One program computes a tile of one (sample, group) plane: ``BLOCK_C`` of the group's
channels by ``BLOCK_P`` positions. Forward ``y[c, p] = sum_k w[k, p] * x[c, p + d_k]``, the
input gradient ``gx[c, p] = sum_k w[k, p - d_k] * gy[c, p - d_k]`` and the kernel gradient
``gw[k, p] = sum_c gy[c, p] * x[c, p + d_k]``, with zeros outside the map, accumulating in
float32 for every input dtype. The taps are runtime loops (nothing is unrolled per channel
or tap, so a specialisation compiles in seconds), and each kernel value is loaded once per
tap and position and applied to all the tile's channels. Nothing is unfolded or padded, so
memory is the output only. ``tools/gpu_compile_check.py`` compiles every specialisation
DWNet uses for sm_80 and sm_90 on a machine without a GPU and reports registers and spills.

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

# Elements of a program's (channels x positions) tile: 2048 float32 sums are 16 registers
# per thread of 4 warps.
TILE = 2048
MAX_BLOCK_C = 64


def block_sizes(channels_per_group: int) -> tuple:
    """``(BLOCK_C, BLOCK_P)``: the channel block (a power of two covering the group, at
    most ``MAX_BLOCK_C``) and the positions that fill a tile of ``TILE`` elements."""
    block_c = min(MAX_BLOCK_C, 1 << max(0, channels_per_group - 1).bit_length())
    return block_c, max(16, min(256, TILE // block_c))


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
                        K: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr):
        # (sample, group) plane ``bg`` of the kernels is plane ``PLANE0 + bg`` of the maps
        bg = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        plane = H * W
        inside = offs < plane
        in_group = chans < CPG
        h = offs // W
        w = offs % W
        pad = K // 2
        x_base = x_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        w_base = w_ptr + bg.to(tl.int64) * K * K * plane
        rows = chans[:, None] * plane
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for i in range(K):
            for j in range(K):
                if TRANSPOSED:  # gather form of the input gradient
                    hh = h - (i - pad)
                    ww = w - (j - pad)
                else:
                    hh = h + (i - pad)
                    ww = w + (j - pad)
                valid = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                src = hh * W + ww
                tap = w_base + (i * K + j) * plane
                if TRANSPOSED:
                    wv = tl.load(tap + src, mask=valid, other=0.)
                else:
                    wv = tl.load(tap + offs, mask=valid, other=0.)
                xv = tl.load(x_base + rows + src[None, :], mask=in_group[:, None] & valid[None, :],
                             other=0.)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        y_base = y_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        tl.store(y_base + rows + offs[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=in_group[:, None] & inside[None, :])

    @triton.jit
    def _weight_grad_kernel(gy_ptr, x_ptr, gw_ptr, H, W, PLANE0, CPG: tl.constexpr,
                            K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        bg = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        plane = H * W
        inside = offs < plane
        h = offs // W
        w = offs % W
        pad = K // 2
        x_base = x_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        gy_base = gy_ptr + (bg.to(tl.int64) + PLANE0) * CPG * plane
        gw_base = gw_ptr + bg.to(tl.int64) * K * K * plane
        for i in range(K):
            for j in range(K):
                hh = h + (i - pad)
                ww = w + (j - pad)
                valid = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                src = hh * W + ww
                acc = tl.zeros([BLOCK_P], dtype=tl.float32)
                for c0 in range(0, CPG, BLOCK_C):
                    chans = c0 + tl.arange(0, BLOCK_C)
                    rows = chans[:, None] * plane
                    mask = (chans < CPG)[:, None] & valid[None, :]
                    g = tl.load(gy_base + rows + offs[None, :], mask=mask, other=0.)
                    xv = tl.load(x_base + rows + src[None, :], mask=mask, other=0.)
                    acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
                tl.store(gw_base + (i * K + j) * plane + offs, acc.to(gw_ptr.dtype.element_ty),
                         mask=inside)


def _wrapped(fn):
    """``wrap_triton(fn)``. torch 2.11 refuses the interpreter's functions
    (``TRITON_INTERPRET=1``); they launch directly, as eager ``wrap_triton`` kernels do."""
    try:
        return torch.library.wrap_triton(fn)
    except RuntimeError:
        if not interpreting():
            raise
        return fn


def launch(src: Tensor, kernels: Tensor, out: Tensor, sample0: int = 0,
           transposed: bool = False) -> None:
    """Write samples ``sample0 .. sample0 + len(kernels)`` of ``out`` from those of ``src``
    (contiguous (B, C, H, W) maps) and the contiguous (b, G, K, K, H, W) ``kernels``:
    the operator, or with ``transposed`` its input gradient. Launched through
    ``wrap_triton``, so that a traced operator body shows the compiler the kernel."""
    b, groups, k = kernels.shape[:3]
    c, h, w = src.shape[1:]
    cpg = c // groups
    block_c, block_p = block_sizes(cpg)
    grid = (b * groups, triton.cdiv(h * w, block_p), triton.cdiv(cpg, block_c))
    kernel = _wrapped(_forward_kernel)
    kernel[grid](src, kernels, out, h, w, sample0 * groups, CPG=cpg, K=k,
                 TRANSPOSED=transposed, BLOCK_C=block_c, BLOCK_P=block_p)


def launch_weight_grad(grad_output: Tensor, input: Tensor, out: Tensor,
                       sample0: int = 0) -> None:
    """Write ``out`` (contiguous (b, G, K, K, H, W)), the kernel gradient of samples
    ``sample0 .. sample0 + b`` of the contiguous maps ``grad_output`` and ``input``."""
    b, groups, k = out.shape[:3]
    c, h, w = input.shape[1:]
    cpg = c // groups
    block_c, block_p = block_sizes(cpg)
    kernel = _wrapped(_weight_grad_kernel)
    kernel[(b * groups, triton.cdiv(h * w, block_p))](grad_output, input, out, h, w,
                                                      sample0 * groups, CPG=cpg, K=k,
                                                      BLOCK_C=block_c, BLOCK_P=block_p)


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
