"""The Triton kernels of the I-D-DW operator: their logic is checked on CPU through Triton's
interpreter (CI has no GPU); on a CUDA machine also natively and through the dispatcher."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ROOT

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
    import sys, torch
    sys.path.insert(0, {tests_dir!r})
    from reference import idwconv as reference_idwconv
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
    print('OK')
''')


@pytest.mark.slow
@needs_triton
def test_kernels_match_the_reference_in_the_interpreter():
    tests_dir = os.path.join(ROOT, 'tests')
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-c', _SCRIPT.format(tests_dir=tests_dir)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith('OK'), \
        result.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run on the '
                    "`device` machine: tools/gpu_tests.sh)")
def test_cuda_dispatch_uses_triton_and_matches_pytorch(monkeypatch):
    from mmdwnet.ops import inhomogeneous_dwconv as op
    from mmdwnet.ops import inhomogeneous_dwconv2d, triton_idwconv

    # no earlier failure may send this test to the fallback, and none it causes may leak
    monkeypatch.setattr(op, '_triton_failed', [])
    calls = []
    for name in ('forward', 'grad_input', 'weight_grad'):
        kernel = getattr(triton_idwconv, name)
        # the real grad_input calls forward(..., transposed=True): keywords pass through
        monkeypatch.setattr(triton_idwconv, name,
                            lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 56, 56, generator=gen).cuda().requires_grad_()
    w = torch.randn(2, 32, 7, 7, 56, 56, generator=gen).cuda().requires_grad_()
    gy = torch.randn(2, 96, 56, 56, generator=gen).cuda()
    results = []
    for flag in ('1', '0'):  # Triton, then the PyTorch implementation
        monkeypatch.setenv('MMDWNET_TRITON', flag)
        y = inhomogeneous_dwconv2d(x, w)
        results.append((y, *torch.autograd.grad(y, (x, w), gy)))
        if flag == '1':  # the Triton kernels ran, and none failed into the fallback
            assert {'forward', 'grad_input', 'weight_grad'} <= set(calls), calls
            assert not op._triton_failed, op._triton_failed
            calls.clear()
        else:  # MMDWNET_TRITON=0: the PyTorch implementation, no Triton kernel
            assert not calls, calls
    for triton_out, torch_out in zip(*results):
        torch.testing.assert_close(triton_out, torch_out, atol=1e-3, rtol=1e-3)
