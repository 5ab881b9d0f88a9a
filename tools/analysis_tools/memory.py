"""Peak memory of one step (:func:`peak_memory_mb`) and of the benchmarked classifiers'
inference and training steps (:func:`measure_memory`).

Peak memory on CPU is measured in a separate process per model that has run nothing before
(the process's resident-set high-water mark, reset before the measured step, with malloc
returning large blocks to the system so that the mark sees them): a child forked from a copy
of the tool taken before any model ran (:class:`analysis_tools.clean_process.CleanProcess`);
on CUDA with the allocator's peak statistics.
"""
import ctypes
from typing import Callable, Dict, Optional

import torch

from analysis_tools.benchmark_utils import BenchmarkedModel
from analysis_tools.clean_process import CleanProcess


def _rss_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak_rss() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS


def _peak_cpu(fn: Callable[[], object]) -> float:
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc_trim(0)
    base = _rss_kb('VmRSS')
    _reset_peak_rss()
    fn()
    return (_rss_kb('VmHWM') - base) / 1024


def _peak_cuda(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory (MiB) that ``fn()`` adds: the resident set's high-water mark on CPU
    (meaningful in a child of :class:`CleanProcess`; Linux ``/proc``), the allocator's
    peak on CUDA."""
    return (_peak_cuda if device.startswith('cuda') else _peak_cpu)(fn)


def measure_memory_here(name: str, device: str, batch_size: int, img_size: int, dtype: str,
                        fuse: bool) -> Dict:
    """Peak memory (MiB above what is allocated before the step) of one inference and
    one training step, in this process."""
    model = BenchmarkedModel(name, device, batch_size, img_size, dtype, fuse)
    model.inference()
    model.train_step()  # optimizer state exists before the measured step
    return dict(infer_peak_mem_mb=peak_memory_mb(model.inference, device),
                peak_mem_mb=peak_memory_mb(model.train_step, device))


def measure_memory(name: str, device: str, batch_size: int, img_size: int, dtype: str,
                   fuse: bool, clean: Optional[CleanProcess] = None) -> Dict:
    """:func:`measure_memory_here` on CUDA in this process; on CPU in a child of ``clean``,
    a process that has run nothing before (so that earlier models' freed memory does not
    hide this one's peak)."""
    if device.startswith('cuda'):
        return measure_memory_here(name, device, batch_size, img_size, dtype, fuse)
    if clean is None:
        raise ValueError(f'measure_memory: peak memory on {device!r} is measured in a '
                         'child of a CleanProcess; got clean=None')
    return clean.call(measure_memory_here, name, device, batch_size, img_size, dtype, fuse,
                      what=f'memory measurement of {name}')
