"""The compiled CPU kernels of mmdwnet's operators (``csrc/*.cpp``): the inhomogeneous
dynamic depth-wise convolution, its form with kernels predicted inside the operator
(prediction and application fused), and the channels-last static / per-sample depth-wise
convolution.

Compiled on first use with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler)
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), which takes about 30 s on 2 cores once per machine and
source version; later processes load the cached library in milliseconds. The build is
specialised to the CPU's vector width (AVX2 / AVX-512, or portable) and, where the CPU has
AVX-512 BF16, to its bfloat16 dot products where they are the faster choice
(:func:`bf16_dot_products`); it is named after its target so that machines
sharing a cache do not share a wrong build. The build needs, at run time, a C++ compiler
(``g++``; e.g. ``apt-get install g++``) and ``ninja`` (a requirement of mmdwnet), whether
mmdwnet was installed from a checkout, a wheel or an sdist: the wheel carries the sources,
not a binary. If it cannot be built, a warning says why and what to install, and the
operators run their PyTorch implementation. ``python -m mmdwnet.ops.cpu_extension`` builds
the kernels and says which path runs (exit status 1 on the fallback).
Set ``MMDWNET_CPU_EXTENSION=0`` to use the PyTorch implementation deliberately
(:mod:`.config` lists the switches).
"""
import logging
import os.path as osp
import threading
import warnings
from typing import Optional, Tuple

import torch

from . import config

SOURCES = [
    osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', name)
    for name in ('inhomogeneous_dwconv_cpu.cpp', 'predicted_idwconv_cpu.cpp',
                 'depthwise_conv_cpu.cpp', 'gelu_cpu.cpp')
]
FALLBACK_WARNING = (
    'mmdwnet: could not build the CPU kernels of the depth-wise operators, using the slower '
    'PyTorch implementation. They are compiled on first use (also from a wheel) and need a C++ '
    'compiler (g++: e.g. `apt-get install g++`) and ninja (`pip install ninja`). '
    '`python -m mmdwnet.ops.cpu_extension` says which path runs. Reason: {reason}')
_lock = threading.Lock()
_state = {'tried': False, 'ops': None, 'error': None}


def _cpuinfo(field: str) -> str:
    """The value of ``field`` for the first CPU in Linux ``/proc/cpuinfo`` ('' elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line for line in f if line.startswith(field)).split(':', 1)[1].strip()
    except (OSError, StopIteration):
        return ''


def cpu_flags() -> set:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    return set(_cpuinfo('flags').split())


def cpu_vendor() -> str:
    """The CPU's vendor string, e.g. 'GenuineIntel' or 'AuthenticAMD' ('' if unknown)."""
    return _cpuinfo('vendor_id')


def bf16_dot_products(flags: Optional[set] = None,
                      vendor: Optional[str] = None) -> Tuple[bool, bool]:
    """Where the build uses AVX-512 BF16 dot products (VDPBF16PS) for bfloat16 operands:
    ``(gathers, fused)``, in the I-D-DW gathers and their gradients, and in the fused
    predict-and-apply kernels. Both where the CPU has them, except the fused kernels on
    Intel Xeons, which widen to float32 FMAs there; ``MMDWNET_BF16_DOT=1``/``0`` sets both.

    On AMD (Zen 4) both kinds of kernel ran faster with dot products; on an Intel Xeon
    VDPBF16PS issues on one port where FMAs issue on two, which the fused kernels feel and
    the gathers (two values per load) do not (docs/benchmarks.md has the measurements).
    """
    forced = config.bf16_dot_products()
    if forced is not None:
        return forced, forced
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    has = 'avx512_bf16' in flags
    return has, has and vendor != 'GenuineIntel'


def vector_bytes(flags: Optional[set] = None, vendor: Optional[str] = None) -> int:
    """Bytes of the vectors along a row of the map in the I-D-DW kernels of an AVX-512
    build: 64 on Intel CPUs with AVX-512, 32 elsewhere; ``MMDWNET_VEC_BYTES=32``/``64``
    forces it (the builds without AVX-512 always take 32).

    These kernels are bound by loads and shuffles more than by multiply-adds, and Intel
    Xeons issue 512-bit FMAs at 1.7-1.9x the rate of 256-bit ones, so they gain a few
    percent; AMD's Zen 4 splits a 512-bit operation into two halves and was slower
    with them at every DWNet-T stage (docs/benchmarks.md has the measurements).
    """
    forced = config.vector_bytes()
    if forced is not None:
        return forced
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    return 64 if 'avx512f' in flags and vendor == 'GenuineIntel' else 32


def _arch_flags():
    capability = torch.backends.cpu.get_cpu_capability()  # 'AVX512', 'AVX2', 'DEFAULT', ...
    if capability == 'AVX512':
        flags = ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx2', '-mfma']
        width = vector_bytes()
        if width == 64:
            flags.append('-DMMDWNET_VEC_BYTES=64')
        tag = '' if width == 32 else '_v512'
        gathers, fused = bf16_dot_products()
        if gathers and fused:
            return 'avx512bf16' + tag, flags + ['-mavx512bf16']
        if gathers:
            return 'avx512bf16_widefused' + tag, flags + ['-mavx512bf16',
                                                          '-DMMDWNET_FUSED_BF16_WIDENED']
        return 'avx512' + tag, flags
    if capability == 'AVX2':
        return 'avx2', ['-mavx2', '-mfma']
    return 'generic', []


def enabled() -> bool:
    """Whether the compiled kernels may be used (``MMDWNET_CPU_EXTENSION`` is not ``0``)."""
    return config.cpu_extension_enabled()


def load():
    """Build (once) and load the extension; returns ``torch.ops.mmdwnet_cpu`` or None."""
    if not enabled():
        return None
    if _state['tried']:  # every operator call asks: no lock once settled
        return _state['ops']
    with _lock:
        if not _state['tried']:
            _state['tried'] = True
            # torch's builder warns on import that no CUDA runtime exists on CPU-only
            # machines: quiet for this build only
            logger = logging.getLogger('torch.utils.cpp_extension')
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load as load_extension
                suffix, flags = _arch_flags()
                load_extension(
                    name=f'mmdwnet_cpu_ops_{suffix}',
                    sources=SOURCES,
                    # OpenMP pragmas for at::parallel_for (torch's own libgomp is reused)
                    extra_cflags=['-O3', '-fopenmp', *flags],
                    is_python_module=False)
                _state['ops'] = torch.ops.mmdwnet_cpu
            except Exception as e:  # no compiler / ninja / headers: fall back, but say so
                _state['error'] = f'{type(e).__name__}: {str(e).strip()[-500:]}'
                warnings.warn(FALLBACK_WARNING.format(reason=_state['error']))
            finally:
                logger.setLevel(level)
    return _state['ops']


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled kernels can be used (built, or built now). ``torch.compile``
    and ``torch.export`` call this once while tracing and keep the answer as a constant,
    instead of tracing into the build and its lock."""
    return load() is not None


def error() -> Optional[str]:
    """Why the extension could not be built, if it was tried and failed."""
    return _state['error']


def library_path() -> Optional[str]:
    """The file of the loaded compiled kernels, or None where they are not loaded."""
    if load() is None:
        return None
    return next((path for path in torch.ops.loaded_libraries
                 if osp.basename(path).startswith('mmdwnet_cpu_ops_')), None)


def main() -> int:
    """Build (or load) the compiled kernels and say which path the operators run."""
    if not enabled():
        print('mmdwnet CPU kernels: disabled by MMDWNET_CPU_EXTENSION=0; the operators run '
              'their PyTorch implementation')
        return 1
    path = library_path()
    if path is None:
        print(f'mmdwnet CPU kernels: not available, the operators run their PyTorch '
              f'implementation. Reason: {error()}')
        return 1
    print(f'mmdwnet CPU kernels: compiled, loaded from {path}')
    print(f'sources: {osp.dirname(SOURCES[0])}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
