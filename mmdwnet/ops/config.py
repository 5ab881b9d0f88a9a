"""The settings that choose how mmdwnet's operators run, all read here: the environment
switches and the user's backend override (:func:`use_backend`).

============================ ============================================================
``MMDWNET_BACKEND``          a backend every operator that has it must use (as
                             :func:`use_backend`); unset: each operator takes the first
                             backend that can run the call
``MMDWNET_CPU_EXTENSION``    ``0``: never build or use the compiled CPU kernels
``MMDWNET_TRITON``           ``0``: never use the Triton kernels
``MMDWNET_BF16_DOT``         ``0`` / ``1``: build the CPU kernels without / with AVX-512 BF16
                             dot products (default: by CPU, :mod:`.cpu_extension`)
``MMDWNET_VEC_BYTES``        ``32`` / ``64``: vector width of an AVX-512 build (default: by
                             CPU)
============================ ============================================================
"""
import os
from contextlib import contextmanager
from typing import Iterable, Optional

# Every backend an operator may have, in the order they are preferred (dispatch.py).
BACKENDS = ('export', 'cpu_kernels', 'onednn', 'triton', 'pytorch')

ENVIRONMENT = {
    'MMDWNET_BACKEND': BACKENDS,
    'MMDWNET_CPU_EXTENSION': ('0', '1'),
    'MMDWNET_TRITON': ('0', '1'),
    'MMDWNET_BF16_DOT': ('0', '1'),
    'MMDWNET_VEC_BYTES': ('32', '64'),
}

# (backend, operators or None) of the active use_backend contexts, innermost last
_overrides = []


def env(name: str) -> Optional[str]:
    """The value of the environment switch ``name`` (None where unset), checked against
    the values it allows."""
    value = os.environ.get(name)
    if value is not None and value not in ENVIRONMENT[name]:
        allowed = ' or '.join(repr(v) for v in ENVIRONMENT[name])
        raise ValueError(f'{name} must be {allowed}, got {value!r}')
    return value


def cpu_extension_enabled() -> bool:
    """Whether the compiled CPU kernels may be built and used (``MMDWNET_CPU_EXTENSION``)."""
    return env('MMDWNET_CPU_EXTENSION') != '0'


def triton_enabled() -> bool:
    """Whether the Triton kernels may be used (``MMDWNET_TRITON``)."""
    return env('MMDWNET_TRITON') != '0'


def bf16_dot_products() -> Optional[bool]:
    """``MMDWNET_BF16_DOT`` as a bool, None where unset."""
    value = env('MMDWNET_BF16_DOT')
    return None if value is None else value == '1'


def vector_bytes() -> Optional[int]:
    """``MMDWNET_VEC_BYTES`` as an int, None where unset."""
    value = env('MMDWNET_VEC_BYTES')
    return None if value is None else int(value)


def backend_override(op: str) -> Optional[str]:
    """The backend operator ``op`` must use: the innermost :func:`use_backend` that
    names it (or names no operators), else ``MMDWNET_BACKEND``; None for a free choice."""
    for name, ops in reversed(_overrides):
        if ops is None or op in ops:
            return name
    return env('MMDWNET_BACKEND')


@contextmanager
def use_backend(name: str, ops: Optional[Iterable[str]] = None):
    """Run mmdwnet's operators with the backend ``name`` within this context.

    Every operator that has the backend (or only those named in ``ops``) must use it and
    raises an error saying why where it cannot; operators without it choose as usual.
    :func:`mmdwnet.ops.export_mode` still comes first. It holds for the whole process
    (backward passes run on other threads), like ``torch.backends`` flags.

    Args:
        name (str): One of ``'export'``, ``'cpu_kernels'``, ``'onednn'``, ``'triton'``,
            ``'pytorch'``.
        ops (Iterable[str], optional): The operators it applies to (names as
            :data:`mmdwnet.ops.dispatch.OPERATORS` has them). Defaults to None (all).

    Example:
        >>> with use_backend('pytorch'):  # the reference implementation everywhere
        ...     out = model(inputs)
    """
    from .dispatch import OPERATORS  # the table of operators and their backends
    if name not in BACKENDS:
        raise ValueError(f'use_backend: `name` must be one of {list(BACKENDS)}, got {name!r}')
    if ops is not None:
        ops = tuple(ops)
        unknown = [op for op in ops if op not in OPERATORS]
        if unknown:
            raise ValueError(f'use_backend: `ops` must name operators of {sorted(OPERATORS)}, '
                             f'got {unknown}')
    _overrides.append((name, ops))
    try:
        yield
    finally:
        _overrides.remove((name, ops))
