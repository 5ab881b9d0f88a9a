"""glibc's malloc settings for the benchmarks (``mallopt`` through ctypes): keep freed
memory for the timings, give it back at once for the peak-memory measurements."""
import ctypes

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _mallopt(*settings) -> bool:
    """Apply ``(parameter, value)`` pairs with glibc's ``mallopt``; False (and nothing
    changed) where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than give it back to the
    system: no separately mapped blocks (``M_MMAP_MAX`` 0) and no trimming of the heap.

    By default glibc maps every block above 32 MiB separately and unmaps it when freed, so
    each training step touches its large activations afresh: hundreds of thousands of page
    faults, 0.1 to 1.5 s of system time per step here, varying from step to step. With
    freed memory kept, the timings measure the models rather than the page-fault
    handler. This is what PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``)
    gets by preloading tcmalloc or jemalloc configured to keep freed memory. It applies to
    the whole process and cannot be undone; returns False (and changes nothing) where the
    C library is not glibc.
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """Make glibc's malloc return every freed block of 1 MiB or more to the system at once
    (separately mapped blocks, no trimming threshold), so that the resident set follows
    the live tensors rather than heap reuse: what a peak-memory measurement needs, for
    the allocations made after the call. Returns False where the C library is not glibc.
    """
    return _mallopt((_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 0))
