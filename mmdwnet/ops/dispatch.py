"""Which implementation of each mmdwnet operator runs, decided here and nowhere else.

Every operator (:data:`OPERATORS`) has an ordered list of backends. A call runs on the first
backend that can run it; each backend that cannot says why (:meth:`Backend.why_not`), and
:func:`explain` lists those answers for a given call. The backends:

- ``export``: the operator written in standard graph operations, inside
  :func:`mmdwnet.ops.export_mode` (:mod:`.export_form`);
- ``cpu_kernels``: the compiled CPU kernels (:mod:`.cpu_extension`);
- ``onednn``: oneDNN's fused CPU kernels (linear or convolution with its activation or
  addition), for inference;
- ``triton``: the Triton kernels on CUDA (:mod:`.triton_idwconv`);
- ``pytorch``: PyTorch's own operations, which run everywhere.

``cpu_kernels``, ``triton`` and ``pytorch`` of the dynamic operators run inside one
registered operator per operator and direction (``torch.ops.mmdwnet.<name>``), which
chooses among them when it runs, so that a compiled or exported program takes whatever
runs where it is executed. The other backends run outside it: ``export`` and ``onednn``
must be seen by exporters and compilers as the standard operations, and the compiled
kernels that take an operator's output norm have no backward.

Two rules hold for every operator. A backend that is not a registered operator with fake
kernels (``onednn``, the compiled forms without autograd) declines calls while a graph is
captured (:func:`capturing`), so tracers, compilers and exporters see the standard
operations. Under autocast every operand is cast to the autocast dtype first
(:func:`autocast`), as autocast casts a convolution's operands.

The user's override (:func:`mmdwnet.ops.use_backend`, ``MMDWNET_BACKEND``) and the
environment switches are read in :mod:`.config`. A backend a call had to pass over on its
device is recorded with its reason, once (:func:`fallbacks`; logged at INFO to the
``mmdwnet`` logger).
"""
import functools
import logging
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import config, cpu_extension, export_form, triton_idwconv

__all__ = ['OPERATORS', 'Call', 'choose', 'explain', 'fallbacks', 'autocast', 'capturing']

logger = logging.getLogger('mmdwnet')


class Call(NamedTuple):
    """What a backend needs to know to say whether it can run a call."""
    op: str
    device: str
    dtype: torch.dtype
    tensors: Tuple[Tensor, ...]
    grad: bool  # autograd records the call
    options: Dict


def make_call(op: str, *tensors: Optional[Tensor], **options) -> Call:
    """The :class:`Call` of operator ``op`` on ``tensors`` (the first one decides device
    and dtype; None entries are dropped) with the operator's ``options``."""
    tensors = tuple(t for t in tensors if t is not None)
    first = tensors[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return Call(op, first.device.type, first.dtype, tensors, grad, options)


def capturing() -> Optional[str]:
    """What captures a graph now (export mode, ``torch.jit`` tracing, ``torch.compile`` or
    ``torch.export``), or None."""
    if export_form.in_export_mode():
        return 'export mode'
    if torch.jit.is_tracing():
        return 'torch.jit tracing'
    if torch.compiler.is_compiling():
        return 'torch.compile / torch.export tracing'
    return None


def _captured() -> Optional[str]:
    """Why a backend outside the registered operators declines now: a graph is captured
    and would not see the standard operations (None where none is)."""
    capture = capturing()
    return None if capture is None else (
        f'not a registered operator, and {capture} captures the graph')


def autocast(device_type: str, *tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """``tensors`` in the autocast dtype where autocast is on for ``device_type`` (None
    entries stay None), else as they are: every backend then runs in that dtype."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class Backend:
    """One way to run operators: :meth:`why_not` says why it cannot run a call (None where
    it can), from what every operator needs of it and the operator's own ``checks``."""
    name = ''
    devices: Optional[Tuple[str, ...]] = None  # None: any device
    registered = True  # runs inside the registered operator
    recorded = True  # passing it over is a fallback worth recording

    def __init__(self):
        self.checks: Dict[str, Callable[[Call], Optional[str]]] = {}

    def accepts(self, device: str) -> bool:
        """Whether it runs on tensors of ``device`` at all."""
        return self.devices is None or device in self.devices

    def why_not(self, call: Call) -> Optional[str]:
        if not self.accepts(call.device):
            return f'runs on {" / ".join(self.devices)} tensors, got {call.device}'
        reason = self.why_not_any(call)
        if reason is None and call.op in self.checks:
            reason = self.checks[call.op](call)
        return reason

    def why_not_any(self, call: Call) -> Optional[str]:
        return None


class ExportBackend(Backend):
    name, registered, recorded = 'export', False, False

    def why_not_any(self, call):
        return None if export_form.in_export_mode() else 'outside mmdwnet.ops.export_mode()'


class CpuKernels(Backend):
    name, devices = 'cpu_kernels', ('cpu', )

    def why_not_any(self, call):
        if not call.dtype.is_floating_point:
            return f'takes floating-point tensors, got {call.dtype}'
        if cpu_extension.available():  # reads the switch too: one read on the hot path
            return None
        if not config.cpu_extension_enabled():
            return 'switched off by MMDWNET_CPU_EXTENSION=0'
        return f'the compiled CPU kernels could not be built: {cpu_extension.error()}'


class OneDNN(Backend):
    name, devices, registered = 'onednn', ('cpu', ), False

    def why_not_any(self, call):
        if call.grad:
            return 'inference only (no backward), and autograd records this call'
        captured = _captured()
        if captured is not None:
            return captured
        if not call.tensors[0].numel():
            return 'empty input'
        if not _has_mkldnn_op(call.options.get('kernel', '_linear_pointwise')):
            return 'this torch build has no oneDNN kernels'
        dtype = (
            torch.get_autocast_dtype('cpu')
            if torch.is_autocast_enabled('cpu') else call.options.get('weight_dtype', call.dtype))
        if dtype not in onednn_dtypes():
            return (f'oneDNN runs {[str(d) for d in onednn_dtypes()]} on this CPU, '
                    f'the call is {dtype}')
        return None


@functools.lru_cache(maxsize=None)
def _has_mkldnn_op(name: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def onednn_dtypes() -> tuple:
    """The dtypes oneDNN's kernels take on this CPU: float32, and bfloat16 / float16 where
    the CPU has the instructions oneDNN needs for them (AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    for bfloat16; an AVX2-only CPU has neither, and the kernels raise there)."""
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.append(torch.float16)
    return tuple(dtypes)


class TritonBackend(Backend):
    name, devices = 'triton', ('cuda', )

    def __init__(self):
        super().__init__()
        self.failure: Optional[str] = None

    def accepts(self, device):
        # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors
        return device == 'cuda' or (device == 'cpu' and triton_idwconv.interpreting())

    def why_not_any(self, call):
        if triton_idwconv.triton is None:
            return 'Triton is not importable'
        if not config.triton_enabled():
            return 'switched off by MMDWNET_TRITON=0'
        if self.failure is not None:
            return f'failed earlier in this process: {self.failure}'
        return None

    def failed(self, error: Exception) -> None:
        """Decline every later call, and say so once: the kernels failed with ``error``
        (e.g. no compiler for the GPU)."""
        self.failure = f'{type(error).__name__}: {error}'
        warnings.warn(f'mmdwnet: the Triton kernels failed ({self.failure}); using the '
                      'other backends from now on')


class PyTorch(Backend):
    name = 'pytorch'


EXPORT, CPU_KERNELS, ONEDNN = ExportBackend(), CpuKernels(), OneDNN()
TRITON, PYTORCH = TritonBackend(), PyTorch()
BACKENDS = {b.name: b for b in (EXPORT, CPU_KERNELS, ONEDNN, TRITON, PYTORCH)}

# The operators and their backends, in the order they are preferred. The ``.grad_*``
# entries are the backward operators of the registered operators.
OPERATORS = {
    'depthwise_conv2d': (EXPORT, CPU_KERNELS, PYTORCH),
    'inhomogeneous_dwconv2d': (EXPORT, CPU_KERNELS, TRITON, PYTORCH),
    'inhomogeneous_dwconv2d.grad_input': (CPU_KERNELS, TRITON, PYTORCH),
    'inhomogeneous_dwconv2d.grad_weight': (CPU_KERNELS, TRITON, PYTORCH),
    'predicted_idwconv2d': (EXPORT, CPU_KERNELS, TRITON, PYTORCH),
    'predicted_idwconv2d.backward': (CPU_KERNELS, TRITON, PYTORCH),
    'predicted_idwconv2d.output_map': (CPU_KERNELS, PYTORCH),
    'gelu_mlp': (CPU_KERNELS, PYTORCH),
    'linear': (ONEDNN, PYTORCH),
    'linear_gelu': (ONEDNN, PYTORCH),
    'linear_add': (ONEDNN, PYTORCH),
    'conv2d_relu': (ONEDNN, PYTORCH),
    'conv2d_add': (ONEDNN, PYTORCH),
}


def _check(backend: Backend, *ops: str):
    """Register the decorated function as ``backend``'s own check for ``ops``."""

    def register(fn):
        for op in ops:
            backend.checks[op] = fn
        return fn

    return register


@_check(CPU_KERNELS, 'depthwise_conv2d')
def _depthwise_cpu(call: Call) -> Optional[str]:
    input, weight = call.tensors[:2]
    k = weight.shape[-1]
    if weight.dtype != input.dtype:
        return f'input {input.dtype} and kernels {weight.dtype} differ'
    if k % 2 == 0 or weight.shape[-2] != k:
        return f'odd square kernels only, got {tuple(weight.shape[-2:])}'
    if not input.is_contiguous(memory_format=torch.channels_last):
        return 'channels-last feature maps only'
    if torch.jit.is_tracing():  # mmengine's FLOP count sees the standard convolution
        return 'torch.jit tracing (FLOP counting) sees the standard convolution'
    return None


@_check(CPU_KERNELS, 'predicted_idwconv2d.output_map')
def _predicted_output_map_cpu(call: Call) -> Optional[str]:
    # the fused kernel that also applies the output's affine map and ReLU: not a registered
    # operator, and without backward
    if call.grad:
        return 'the fused kernel with the output map has no backward'
    captured = _captured()
    if captured is not None:
        return captured
    dtype = call.options['dtype']
    if not cpu_extension.load().predicted_idwconv2d_applies(call.options['kernel_size'], dtype,
                                                            False):
        return f'no fused kernel for K={call.options["kernel_size"]} in {dtype}'
    return None


@_check(CPU_KERNELS, 'gelu_mlp')
def _gelu_mlp_cpu(call: Call) -> Optional[str]:
    # an autograd function for training: forward and backward in float32
    if not call.grad:
        return 'for training: autograd does not record this call'
    if any(t.device.type != 'cpu' or t.dtype != torch.float32 for t in call.tensors):
        return 'float32 CPU tensors only'
    if torch.is_autocast_enabled('cpu'):
        return 'float32 only, and CPU autocast is on'
    if not call.tensors[0].numel():
        return 'empty input'
    captured = _captured()
    if captured is not None:
        return captured
    if not torch.backends.mkldnn.is_available():
        return 'this torch build has no oneDNN'
    return None


@_check(ONEDNN, 'linear_add', 'conv2d_add')
def _fused_addition(call: Call) -> Optional[str]:
    # the fused addition paid in float32 only; bfloat16 takes the product and an in-place sum
    if call.dtype != torch.float32 or torch.is_autocast_enabled('cpu'):
        return 'the fused addition is float32 only (no faster in lower precision)'
    return None


def _allowed(op: str) -> Tuple[Backend, ...]:
    backends = OPERATORS[op]
    forced = config.backend_override(op)
    if forced is None or not any(b.name == forced for b in backends):
        return backends
    if EXPORT in backends and export_form.in_export_mode():
        return (EXPORT, )
    return (BACKENDS[forced], )


def choose(call: Call, registered: bool = False) -> Backend:
    """The backend that runs ``call``: the first of its operator's backends (``registered``:
    of those inside the registered operator) that can, or the one the override names,
    which must then be able to."""
    allowed = _allowed(call.op)
    for backend in allowed:
        if registered and not backend.registered:
            continue
        reason = backend.why_not(call)
        if reason is None:
            return backend
        if len(allowed) == 1:
            raise RuntimeError(f'mmdwnet: {call.op} must use the backend {backend.name!r} '
                               f'(mmdwnet.ops.use_backend / MMDWNET_BACKEND), which cannot '
                               f'run this call: {reason}')
        if backend.recorded and backend.accepts(call.device):
            _record(call, backend, reason)
    raise AssertionError(f'{call.op}: no backend runs on {call.device}')  # pytorch does


_fallbacks: Dict[Tuple[str, str, str], str] = {}


def _record(call: Call, backend: Backend, reason: str) -> None:
    if torch.compiler.is_compiling():  # no side effects in a traced function
        return
    key = (call.op, call.device, backend.name)
    if key not in _fallbacks:
        _fallbacks[key] = reason
        logger.info(f'mmdwnet: {call.op} on {call.device} passed over {backend.name!r}: '
                    f'{reason}')


def fallbacks() -> Dict[Tuple[str, str, str], str]:
    """``{(operator, device, backend): reason}`` for each backend that a call of this
    process passed over on its device (the first reason for each)."""
    return dict(_fallbacks)


def explain(op: str, *tensors: Optional[Tensor], **options) -> List[Tuple[str, Optional[str]]]:
    """``[(backend, why it declines or None), ...]`` for operator ``op`` called on
    ``tensors`` with ``options`` now, in the order the backends are preferred; the first
    None is the backend that runs it.

    Example:
        >>> from mmdwnet.ops.dispatch import explain
        >>> explain('inhomogeneous_dwconv2d', x, kernels)
        [('export', 'outside mmdwnet.ops.export_mode()'), ('cpu_kernels', None), ...]
    """
    if op not in OPERATORS:
        raise ValueError(f'explain: `op` must be one of {sorted(OPERATORS)}, got {op!r}')
    call = make_call(op, *tensors, **options)
    return [(backend.name, backend.why_not(call)) for backend in OPERATORS[op]]


def _tensor_call(op: str, args) -> Call:
    """The :class:`Call` of a registered operator from its arguments (tensors decide)."""
    return make_call(op, *(a for a in args if isinstance(a, Tensor)))


def run(op: str, implementation: Callable, *args):
    """``implementation(backend, *args)`` for the backend chosen among those inside the
    registered operator: the body of each registered operator. Where the Triton kernels
    fail eagerly (e.g. no compiler for the GPU), the backend is switched off with one
    warning and the call runs on the next one."""
    backend = choose(_tensor_call(op, args), registered=True)
    if backend is not TRITON or torch.compiler.is_compiling():
        return implementation(backend.name, *args)
    try:
        with _eager_triton():
            return implementation('triton', *args)
    except torch.OutOfMemoryError:  # the other backends need more memory, not less
        raise
    except Exception as e:
        TRITON.failed(e)
        return run(op, implementation, *args)


def _eager_triton():
    """Eagerly, ``wrap_triton`` kernels launch directly (as in ``torch.library.triton_op``'s
    own kernel) instead of through the higher-order operator that tracing records."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # pragma: no cover - a torch without it launches through the wrapper
        import contextlib
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


def trace_triton_under_compile(operator, op: str, implementation: Callable) -> None:
    """Where ``triton`` runs a call of the registered ``operator`` (operator ``op`` of
    :data:`OPERATORS`), let ``torch.compile`` (AOT autograd's functionalization) trace it
    into ``implementation('triton', ...)``'s Triton kernels, so that Inductor sees and
    schedules them, as ``torch.library.triton_op`` does; every other call, and
    ``torch.export`` (which keeps named operators), sees the operator whole."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def decompose(mode, func, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled
        known = (torch.Tensor, FunctionalTensor)
        if (not custom_triton_ops_decomposition_disabled()
                and all(issubclass(t, FakeTensor) or t in known for t in types)
                and choose(_tensor_call(op, args), registered=True) is TRITON):
            with mode:
                return implementation('triton', *args, **kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    operator.register_torch_dispatch(FunctionalTensorMode, decompose)
