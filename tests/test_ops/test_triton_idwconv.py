"""The Triton kernels of the I-D-DW operator: their logic is checked on CPU through Triton's
interpreter (CI has no GPU); on a CUDA machine also natively and through the dispatcher."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmdwnet.ops import triton_idwconv

needs_triton = pytest.mark.skipif(
    triton_idwconv.triton is None,
    reason='Triton is not importable and this torch build does not ship it (see '
    'test_triton_is_importable_where_torch_ships_it)')


def test_triton_is_importable_where_torch_ships_it():
    """A torch whose wheel depends on Triton (Linux) must have it importable: the kernel
    tests below would otherwise skip, and the CUDA path would silently fall back."""
    if triton_idwconv.shipped_with_torch():
        assert triton_idwconv.triton is not None, 'torch requires Triton here, but ' \
            '`import triton` fails: reinstall torch with its dependencies'
    else:  # nothing to require: say so in the output (pytest -rs lists the reason)
        pytest.skip('this torch build does not depend on Triton; its kernels are untested')


_SCRIPT = textwrap.dedent('''
    import torch
    from mmdwnet.testing.reference import idwconv as reference_idwconv
    from mmdwnet.ops import triton_idwconv
    torch.manual_seed(0)
    # odd and even K (12: the 384 fine-tuning kernels, larger than one map here)
    for b, c, g, k, h, w, dtype in [(2, 6, 3, 3, 5, 7, torch.float32),
                                    (1, 8, 2, 4, 6, 5, torch.float32),
                                    (1, 4, 2, 12, 7, 9, torch.float32),
                                    (2, 4, 4, 3, 9, 20, torch.bfloat16)]:
        x = torch.randn(b, c, h, w, dtype=torch.float64)
        wt = torch.randn(b, g, k, k, h, w, dtype=torch.float64)
        gy = torch.randn(b, c, h, w, dtype=torch.float64)
        xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = reference_idwconv(xr, wr)
        gx, gw = torch.autograd.grad(y, (xr, wr), gy)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        got = [triton_idwconv.forward(x.to(dtype), wt.to(dtype)),
               triton_idwconv.forward(gy.to(dtype), wt.to(dtype), True),
               triton_idwconv.weight_grad(gy.to(dtype), x.to(dtype), g, k)]
        for name, ours, ref in zip(['forward', 'grad_input', 'grad_weight'], got, [y, gx, gw]):
            assert ours.dtype == dtype and ours.shape == ref.shape, name
            err = (ours.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err < tol, (name, k, dtype, err)

    # the registered operators on the Triton backend, with their autograd, against the
    # PyTorch backend; a tiny chunk budget splits the fused operator's batch in two
    from mmdwnet.ops import (inhomogeneous_dwconv2d, predicted_idwconv, predicted_idwconv2d,
                             use_backend)
    b, c, g, k, h, w, r = 3, 8, 2, 3, 6, 5, 4
    x = torch.randn(b, c, h, w, requires_grad=True)
    wt = torch.randn(b, g, k, k, h, w, requires_grad=True)
    hid = torch.randn(b, r, h, w, requires_grad=True)
    pw = torch.randn(g * k * k, r, requires_grad=True)
    pb = torch.randn(g * k * k, requires_grad=True)
    gy = torch.randn(b, c, h, w)
    predicted_idwconv.CHUNK_BYTES_OTHER = predicted_idwconv.CHUNK_BYTES['cpu'] = \
        2 * g * k * k * h * w * 4
    assert len(predicted_idwconv._chunks(x, g * k * k)) == 2
    for op, inputs in [(inhomogeneous_dwconv2d, (x, wt)),
                       (lambda *a: predicted_idwconv2d(*a, k), (x, hid, pw, pb))]:
        results = []
        for backend in ('triton', 'pytorch'):
            with use_backend(backend):
                y = op(*inputs)
                results.append((y, *torch.autograd.grad(y, inputs, gy)))
        for a, b_ in zip(*results):
            torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)
    print('OK')
''')


@pytest.mark.slow
@needs_triton
def test_kernels_match_the_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-c', _SCRIPT],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith('OK'), \
        result.stderr[-3000:]


def _aot_graph(fn, *args):
    """The forward graph AOT autograd hands a compiler backend (Inductor) for ``fn`` on
    ``args``, traced with fake tensors (which may claim CUDA without a GPU)."""
    from torch._functorch.aot_autograd import aot_function
    graphs = []
    traced = aot_function(fn, fw_compiler=lambda gm, _: graphs.append(gm) or gm)
    with torch.no_grad():
        traced(*args)
    return graphs[0]


def _calls(gm):
    """The kernels (by name) and operators a graph calls."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = []
    for node in gm.graph.nodes:
        if node.op != 'call_function':
            continue
        if 'triton_kernel_wrapper' in str(node.target):
            names.append(kernel_side_table.get_kernel(node.kwargs['kernel_idx']).fn.__name__)
        else:
            names.append(str(node.target))
    return names


@needs_triton
def test_compiler_sees_the_triton_kernels_on_cuda(caplog):
    """On CUDA the I-D-DW operators trace into their Triton kernels under torch.compile:
    what it hands Inductor contains the Triton kernels themselves, not an opaque call.
    Traced with fake CUDA tensors (no GPU needed; without a GPU Triton cannot analyse which
    arguments a kernel writes and assumes all, which changes nothing here)."""
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmdwnet.models import DWNet
    from mmdwnet.ops import inhomogeneous_dwconv2d, predicted_idwconv
    caplog.set_level(logging.ERROR, logger='torch._higher_order_ops.triton_kernel_wrap')
    model = DWNet(arch='tiny', conv_type='iddw').eval()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    mode = FakeTensorMode()
    with mode:
        state = {name: torch.empty(t.shape, dtype=t.dtype, device='cuda')
                 for name, t in state.items()}
        image = torch.empty(1, 3, 64, 64, device='cuda')
        x, gy = torch.empty(2, 8, 6, 5, device='cuda'), torch.empty(2, 8, 6, 5, device='cuda')
        hidden = torch.empty(2, 4, 6, 5, device='cuda')
        weight, bias = torch.empty(18, 4, device='cuda'), torch.empty(18, device='cuda')
        kernels = torch.empty(2, 2, 3, 3, 6, 5, device='cuda')
        # the whole I-D-DW-T backbone: one kernel launch per block (2 + 2 + 6 + 2)
        calls = _calls(_aot_graph(
            lambda s, x: torch.func.functional_call(model, s, (x, )), state, image))
        assert calls.count('_forward_kernel') == 12, calls
        assert not [c for c in calls if 'mmdwnet' in c], calls
        # the fused operator's backward: kernel prediction, input and kernel gradients
        calls = _calls(_aot_graph(
            lambda *a: predicted_idwconv._triton_backward(*a, 3), gy, x, hidden, weight,
            bias))
        assert {'aten.baddbmm.default', '_forward_kernel', '_weight_grad_kernel'} <= set(
            calls), calls
        # the stand-alone operator
        calls = _calls(_aot_graph(inhomogeneous_dwconv2d, x, kernels))
        assert '_forward_kernel' in calls and not [c for c in calls if 'mmdwnet' in c], calls


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run on the '
                    "`device` machine: tools/gpu_check.sh)")
def test_cuda_dispatch_uses_triton_and_matches_pytorch(monkeypatch):
    from mmdwnet.ops import dispatch, explain, inhomogeneous_dwconv2d, triton_idwconv

    # no earlier failure may send this test to the fallback, and none it causes may leak
    monkeypatch.setattr(dispatch.TRITON, 'failure', None)
    calls = []
    for name in ('launch', 'launch_weight_grad'):
        kernel = getattr(triton_idwconv, name)
        monkeypatch.setattr(
            triton_idwconv, name,
            lambda *a, _k=kernel, _n=name, **kw: calls.append(
                'grad_input' if kw.get('transposed') else _n) or _k(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 56, 56, generator=gen).cuda().requires_grad_()
    w = torch.randn(2, 32, 7, 7, 56, 56, generator=gen).cuda().requires_grad_()
    gy = torch.randn(2, 96, 56, 56, generator=gen).cuda()
    results = []
    for flag in ('1', '0'):  # Triton, then the PyTorch implementation
        monkeypatch.setenv('MMDWNET_TRITON', flag)
        chosen = [name for name, why in explain('inhomogeneous_dwconv2d', x, w) if why is None]
        assert chosen[0] == ('triton' if flag == '1' else 'pytorch'), chosen
        y = inhomogeneous_dwconv2d(x, w)
        results.append((y, *torch.autograd.grad(y, (x, w), gy)))
        if flag == '1':  # the Triton kernels ran, and none failed into the fallback
            assert {'launch', 'grad_input', 'launch_weight_grad'} <= set(calls), calls
            assert dispatch.TRITON.failure is None, dispatch.TRITON.failure
            calls.clear()
        else:  # MMDWNET_TRITON=0: the PyTorch implementation, no Triton kernel
            assert not calls, calls
    for triton_out, torch_out in zip(*results):
        torch.testing.assert_close(triton_out, torch_out, atol=1e-3, rtol=1e-3)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run on the '
                    "`device` machine: tools/gpu_check.sh)")
def test_inductor_compiles_the_triton_operators_on_cuda():
    """torch.compile (Inductor) of the fused operator, forward and backward, on the GPU:
    the same outputs and gradients as eager."""
    from mmdwnet.ops import predicted_idwconv2d
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=gen).cuda().requires_grad_()
              for shape in [(2, 64, 28, 28), (2, 16, 28, 28), (2 * 49, 16), (2 * 49, )]]
    gy = torch.randn(2, 64, 28, 28, generator=gen).cuda()
    results = []
    for fn in (predicted_idwconv2d, torch.compile(predicted_idwconv2d, fullgraph=True)):
        y = fn(*inputs, 7)
        results.append((y, *torch.autograd.grad(y, inputs, gy)))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
