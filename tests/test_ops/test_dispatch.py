"""The operator dispatch (mmdwnet/ops/dispatch.py, config.py): for every operator and
device, which backends it has, in which order, and why each declines a given call; the
user's override; the recorded fallbacks."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmdwnet.ops import (depthwise_conv2d, dispatch, explain, export_mode, fallbacks,
                         inhomogeneous_dwconv2d, triton_idwconv, use_backend)

EXPORT_OFF = 'outside mmdwnet.ops.export_mode()'
CPU_ONLY = 'runs on cpu tensors, got cuda'
NO_TRITON = None if triton_idwconv.triton is not None else 'Triton is not importable'
TRITON_CPU = 'runs on cuda tensors, got cpu'
INFERENCE_ONLY = 'inference only (no backward), and autograd records this call'


def _calls(device: str, grad: bool):
    """A representative call of every operator: (operator, tensors, options)."""
    cl = torch.channels_last
    x = torch.randn(2, 8, 6, 5, device=device).contiguous(memory_format=cl)
    gy = torch.randn(2, 8, 6, 5, device=device)
    kernels = torch.randn(2, 2, 3, 3, 6, 5, device=device)
    hidden = torch.randn(2, 4, 6, 5, device=device)
    weight, bias = torch.randn(18, 4, device=device), torch.randn(18, device=device)
    rows, fc = torch.randn(4, 8, device=device), torch.randn(16, 8, device=device)
    conv = torch.randn(8, 8, 1, 1, device=device)
    if grad:
        for t in (x, kernels, hidden, weight, rows, fc, conv):
            t.requires_grad_()
    predicted = (x, hidden, weight, bias)
    return {
        'depthwise_conv2d': ((x, torch.randn(8, 1, 3, 3, device=device)), {}),
        'inhomogeneous_dwconv2d': ((x, kernels), {}),
        'inhomogeneous_dwconv2d.grad_input': ((gy, kernels), {}),
        'inhomogeneous_dwconv2d.grad_weight': ((gy, x), {}),
        'predicted_idwconv2d': (predicted, {}),
        'predicted_idwconv2d.backward': ((gy, *predicted), {}),
        'predicted_idwconv2d.output_map': (predicted, dict(kernel_size=3, dtype=torch.float32)),
        'gelu_mlp': ((rows, fc), {}),
        'linear': ((rows, fc), {}),
        'linear_gelu': ((rows, fc), {}),
        'linear_add': ((rows, torch.randn(4, 16, device=device), fc), {}),
        'conv2d_relu': ((x, conv), dict(kernel='_convolution_pointwise')),
        'conv2d_add': ((x, x, conv), dict(kernel='_convolution_pointwise')),
    }


# (operator, device, autograd records the call) -> [(backend, why it declines or None)]
EXPECTED = {
    ('depthwise_conv2d', 'cpu', False): [('export', EXPORT_OFF), ('cpu_kernels', None),
                                         ('pytorch', None)],
    ('depthwise_conv2d', 'cuda', False): [('export', EXPORT_OFF), ('cpu_kernels', CPU_ONLY),
                                          ('pytorch', None)],
    ('inhomogeneous_dwconv2d', 'cpu', False): [('export', EXPORT_OFF), ('cpu_kernels', None),
                                               ('triton', TRITON_CPU), ('pytorch', None)],
    ('inhomogeneous_dwconv2d', 'cuda', False): [('export', EXPORT_OFF), ('cpu_kernels', CPU_ONLY),
                                                ('triton', NO_TRITON), ('pytorch', None)],
    ('predicted_idwconv2d.output_map', 'cpu', False): [('cpu_kernels', None), ('pytorch', None)],
    ('predicted_idwconv2d.output_map', 'cpu', True):
    [('cpu_kernels', 'the fused kernel with the output map has no backward'), ('pytorch', None)],
    ('predicted_idwconv2d.output_map', 'cuda', False): [('cpu_kernels', CPU_ONLY),
                                                        ('pytorch', None)],
    ('gelu_mlp', 'cpu', False):
    [('cpu_kernels', 'for training: autograd does not record this call'), ('pytorch', None)],
    ('gelu_mlp', 'cpu', True): [('cpu_kernels', None), ('pytorch', None)],
    ('gelu_mlp', 'cuda', True): [('cpu_kernels', CPU_ONLY), ('pytorch', None)],
}
for _op in ('inhomogeneous_dwconv2d.grad_input', 'inhomogeneous_dwconv2d.grad_weight',
            'predicted_idwconv2d.backward'):
    EXPECTED[_op, 'cpu', False] = [('cpu_kernels', None), ('triton', TRITON_CPU), ('pytorch', None)]
    EXPECTED[_op, 'cuda', False] = [('cpu_kernels', CPU_ONLY), ('triton', NO_TRITON),
                                    ('pytorch', None)]
EXPECTED['predicted_idwconv2d', 'cpu', False] = EXPECTED['inhomogeneous_dwconv2d', 'cpu', False]
EXPECTED['predicted_idwconv2d', 'cuda', False] = EXPECTED['inhomogeneous_dwconv2d', 'cuda', False]
for _op in ('linear', 'linear_gelu', 'linear_add', 'conv2d_relu', 'conv2d_add'):
    EXPECTED[_op, 'cpu', False] = [('onednn', None), ('pytorch', None)]
    EXPECTED[_op, 'cpu', True] = [('onednn', INFERENCE_ONLY), ('pytorch', None)]
    EXPECTED[_op, 'cuda', False] = [('onednn', CPU_ONLY), ('pytorch', None)]


def _explain(op: str, device: str, grad: bool):
    if device == 'cpu':
        tensors, options = _calls(device, grad)[op]
        return explain(op, *tensors, **options)
    with FakeTensorMode():  # CUDA tensors without a GPU
        tensors, options = _calls(device, grad)[op]
        return explain(op, *tensors, **options)


def test_every_operator_and_device_is_enumerated():
    assert {op for op, _, _ in EXPECTED} == set(dispatch.OPERATORS)
    assert {(op, device)
            for op, device, _ in EXPECTED} == {(op, device)
                                               for op in dispatch.OPERATORS
                                               for device in ('cpu', 'cuda')}


@pytest.mark.parametrize('op, device, grad', sorted(EXPECTED), ids=lambda v: str(v))
def test_backends_and_why_each_declines(op, device, grad):
    """The backends of each operator in the order they are preferred, and the reason each
    declines the representative call (None: it can run it; the first None runs it)."""
    assert _explain(op, device, grad) == EXPECTED[op, device, grad]


def test_switches_and_export_mode_change_the_answers(monkeypatch):
    """The environment switches and export mode, as each backend reports them."""
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    kernels = torch.randn(2, 2, 3, 3, 6, 5)
    with export_mode():
        assert explain('inhomogeneous_dwconv2d', x, kernels)[0] == ('export', None)
        # not registered operators: they decline while a graph is captured
        assert dict(explain('linear', x[:, :, 0, 0], torch.randn(
            4, 8)))['onednn'] == ('not a registered operator, and export mode captures the graph')
    monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '0')
    assert dict(explain('inhomogeneous_dwconv2d', x,
                        kernels))['cpu_kernels'] == ('switched off by MMDWNET_CPU_EXTENSION=0')
    assert dict(explain('depthwise_conv2d', x.contiguous(), torch.randn(8, 1, 4, 4))) == {
        'export': EXPORT_OFF,
        'cpu_kernels': 'switched off by MMDWNET_CPU_EXTENSION=0',
        'pytorch': None
    }
    monkeypatch.delenv('MMDWNET_CPU_EXTENSION')
    assert dict(explain('depthwise_conv2d', x,
                        torch.randn(8, 1, 4,
                                    4)))['cpu_kernels'] == ('odd square kernels only, got (4, 4)')
    assert dict(explain('depthwise_conv2d', x.contiguous(),
                        torch.randn(8, 1, 3,
                                    3)))['cpu_kernels'] == 'channels-last feature maps only'
    assert dict(
        explain('inhomogeneous_dwconv2d', x.long(),
                kernels.long()))['cpu_kernels'] == 'takes floating-point tensors, got torch.int64'
    if NO_TRITON is None:
        monkeypatch.setenv('MMDWNET_TRITON', '0')
        with FakeTensorMode():
            cuda = [
                torch.empty(2, 8, 6, 5, device='cuda'),
                torch.empty(2, 2, 3, 3, 6, 5, device='cuda')
            ]
            assert dict(explain('inhomogeneous_dwconv2d',
                                *cuda))['triton'] == ('switched off by MMDWNET_TRITON=0')
    monkeypatch.setenv('MMDWNET_TRITON', 'off')
    with pytest.raises(ValueError, match=r"MMDWNET_TRITON must be '0' or '1', got 'off'"):
        dispatch.config.triton_enabled()
    with pytest.raises(ValueError, match=r"explain: `op` must be one of \["):
        explain('involution', x, kernels)


def test_use_backend_forces_a_backend(compiled_ops):
    """use_backend (and MMDWNET_BACKEND) make every operator that has the backend use it,
    or raise with the backend's reason; the operators' results agree."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    kernels = torch.randn(2, 2, 3, 3, 6, 5)
    fast = inhomogeneous_dwconv2d(x, kernels)
    assert compiled_ops.ran() == {'inhomogeneous_dwconv2d'}
    compiled_ops.calls.clear()
    with use_backend('pytorch'):
        reference = inhomogeneous_dwconv2d(x, kernels)
        depthwise_conv2d(x, torch.randn(8, 1, 3, 3))
    assert compiled_ops.calls == []
    torch.testing.assert_close(fast, reference)
    with use_backend('pytorch', ops=['depthwise_conv2d']):  # only that operator
        inhomogeneous_dwconv2d(x, kernels)
    assert compiled_ops.ran() == {'inhomogeneous_dwconv2d'}
    with use_backend('onednn'), pytest.raises(RuntimeError) as error:
        inhomogeneous_dwconv2d(x, kernels)  # operators without onednn choose as usual
        from mmdwnet.models.utils.fused_layers import linear
        linear(x[:, :, 0, 0].requires_grad_(), torch.randn(4, 8))
    assert str(
        error.value) == ("mmdwnet: linear must use the backend 'onednn' (mmdwnet.ops.use_backend / "
                         f'MMDWNET_BACKEND), which cannot run this call: {INFERENCE_ONLY}')
    with pytest.raises(ValueError, match=r"use_backend: `name` must be one of \['export', "):
        with use_backend('cuda'):
            pass
    with pytest.raises(
            ValueError, match=r"use_backend: `ops` must name operators of .*"
            r"got \['involution'\]"):
        with use_backend('pytorch', ops=['involution']):
            pass
    assert dispatch.config._overrides == []


def test_backend_from_the_environment(monkeypatch, compiled_ops):
    monkeypatch.setenv('MMDWNET_BACKEND', 'pytorch')
    x = torch.randn(2, 8, 6, 5)
    inhomogeneous_dwconv2d(x, torch.randn(2, 2, 3, 3, 6, 5))
    assert compiled_ops.calls == []
    monkeypatch.setenv('MMDWNET_BACKEND', 'fast')
    with pytest.raises(
            ValueError,
            match=r"MMDWNET_BACKEND must be 'export' or 'cpu_kernels' "
            r"or 'onednn' or 'triton' or 'pytorch', got 'fast'"):
        inhomogeneous_dwconv2d(x, torch.randn(2, 2, 3, 3, 6, 5))


def test_fallbacks_are_recorded_once(monkeypatch, caplog):
    """A backend passed over on the call's device is recorded with its reason, once, and
    logged at INFO; backends for other devices and export mode are not fallbacks."""
    import logging
    monkeypatch.setattr(dispatch, '_fallbacks', {})
    monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '0')
    x = torch.randn(2, 8, 6, 5)
    with caplog.at_level(logging.INFO, logger='mmdwnet'):
        for _ in range(2):
            inhomogeneous_dwconv2d(x, torch.randn(2, 2, 3, 3, 6, 5))
    assert fallbacks() == {
        ('inhomogeneous_dwconv2d', 'cpu', 'cpu_kernels'): 'switched off by MMDWNET_CPU_EXTENSION=0'
    }
    assert [r.getMessage() for r in caplog.records] == [
        "mmdwnet: inhomogeneous_dwconv2d on cpu passed over 'cpu_kernels': switched off by "
        'MMDWNET_CPU_EXTENSION=0'
    ]
