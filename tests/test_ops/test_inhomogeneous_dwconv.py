import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import run_tool, tools_env

from mmdwnet.ops import explain, inhomogeneous_dwconv2d, triton_idwconv
from mmdwnet.testing.reference import idwconv as reference_idwconv


def _pair(b, c, g, k, h, w, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(b, g, k, k, h, w, generator=gen, dtype=dtype)
    return x, weight


def test_matches_formula_elementwise():
    # one output element written out by hand from the definition
    x, weight = _pair(1, 4, 2, 3, 4, 5, dtype=torch.float64)
    y = inhomogeneous_dwconv2d(x, weight)
    b, c, h, w = 0, 3, 0, 4  # a corner: some taps fall outside the map
    expected = 0.
    for i in range(3):
        for j in range(3):
            hh, ww = h + i - 1, w + j - 1
            if 0 <= hh < 4 and 0 <= ww < 5:
                expected += weight[b, c // 2, i, j, h, w] * x[b, c, hh, ww]
    assert y[b, c, h, w].item() == pytest.approx(expected.item(), abs=1e-12)


_CPU_OPS = {'inhomogeneous_dwconv2d', 'inhomogeneous_dwconv2d_grad_input',
            'inhomogeneous_dwconv2d_grad_weight'}


@pytest.fixture(params=['compiled', 'pytorch'])
def cpu_path(request, monkeypatch):
    """Each CPU implementation in turn: the compiled kernels, then the PyTorch one (also
    the fallback where no compiler exists); afterwards, a check that the forward and both
    gradients ran on that implementation and no other."""
    from mmdwnet.ops import inhomogeneous_dwconv as op
    spy = request.getfixturevalue('compiled_ops')
    monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '1' if request.param == 'compiled' else '0')
    shifts = []
    original = op._shift_accumulate
    monkeypatch.setattr(op, '_shift_accumulate',
                        lambda src, w, transposed, *a: shifts.append(transposed) or original(
                            src, w, transposed, *a))
    yield request.param
    if request.param == 'compiled':
        assert spy.ran() == _CPU_OPS and not shifts, (spy.calls, shifts)
    else:
        assert not spy.calls and set(shifts) == {False, True}, (spy.calls, shifts)


@pytest.mark.parametrize('shape', [(2, 6, 3, 3, 5, 7), (1, 8, 8, 5, 4, 4), (2, 4, 1, 7, 3, 6),
                                   (1, 6, 2, 4, 5, 5), (1, 4, 2, 2, 3, 4)])
def test_gradcheck_float64(shape, cpu_path):
    b, c, g, k, h, w = shape
    x, weight = _pair(b, c, g, k, h, w, dtype=torch.float64)
    x.requires_grad_()
    weight.requires_grad_()
    torch.testing.assert_close(inhomogeneous_dwconv2d(x, weight), reference_idwconv(x, weight),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(inhomogeneous_dwconv2d, (x, weight))


# even K: 4, and the 12 x 12 kernels of the 384 fine-tuning (maps smaller than the kernel
# too); odd K: 7 with the maps of stage 4 and a non-square map
@pytest.mark.parametrize('shape', [(2, 8, 4, 4, 9, 10), (1, 6, 3, 12, 14, 13),
                                   (2, 4, 2, 12, 5, 7), (2, 12, 4, 7, 7, 7), (1, 4, 4, 7, 3, 9),
                                   (1, 32, 2, 7, 100, 64)])
def test_every_kernel_size_matches_the_reference(shape, cpu_path):
    """Forward and both gradients against the unfold reference, even K included. The last
    shape is too large for one output tile of the compiled gathers (16 channels per group
    of 64 columns: tiles of 48 rows), so tiles of 48, 48 and 4 rows meet."""
    b, c, g, k, h, w = shape
    x, weight = _pair(b, c, g, k, h, w, dtype=torch.float64)
    grad = torch.randn(b, c, h, w, dtype=torch.float64)
    got, want = [], []
    for fn, out in ((inhomogeneous_dwconv2d, got), (reference_idwconv, want)):
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fn(xr, wr)
        out.extend([y, *torch.autograd.grad(y, (xr, wr), grad)])
    for name, ours, ref in zip(('forward', 'grad_input', 'grad_weight'), got, want):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_stage1_size_matches_reference(cpu_path):
    # DW-T stage 1 at 224x224: 96 channels, 32 groups, 56x56, K = 7
    x, weight = _pair(2, 96, 32, 7, 56, 56)
    x.requires_grad_()
    weight.requires_grad_()
    grad = torch.randn(2, 96, 56, 56, generator=torch.Generator().manual_seed(1))
    y = inhomogeneous_dwconv2d(x, weight)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    y_ref = reference_idwconv(x, weight)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, weight), grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('planes', [1, 3, 4, 8, 12, 24])
@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_every_block_size(planes, dtype):
    # the GPU processes larger blocks of (sample, group) planes than the CPU does
    from mmdwnet.ops.inhomogeneous_dwconv import _shift_accumulate
    x, weight = (t.to(dtype).double() for t in _pair(3, 8, 4, 5, 6, 7, dtype=torch.float64))
    grad = torch.randn(3, 8, 6, 7).to(dtype).double()
    x_ref = x.detach().requires_grad_()
    reference_idwconv(x_ref, weight).backward(grad)
    expected = dict(forward=reference_idwconv(x, weight), transposed=x_ref.grad)
    for mode, src in (('forward', x), ('transposed', grad)):
        out = _shift_accumulate(src.to(dtype), weight.to(dtype), mode == 'transposed', planes)
        tol = 1e-12 if dtype == torch.float64 else 2**-8  # float32 sums, rounded once
        torch.testing.assert_close(out.double(), expected[mode], rtol=tol, atol=tol)


def test_non_contiguous_inputs():
    x, weight = _pair(2, 8, 4, 3, 6, 5)
    x_cl = x.to(memory_format=torch.channels_last)
    w_t = weight.transpose(4, 5).contiguous().transpose(4, 5)
    out = inhomogeneous_dwconv2d(x_cl, w_t)
    torch.testing.assert_close(out, reference_idwconv(x, weight))
    # the output keeps the input's memory format, as torch's convolutions do
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert inhomogeneous_dwconv2d(x, w_t).is_contiguous()


@pytest.mark.skipif(triton_idwconv.triton is None, reason='Triton is not importable')
def test_failing_triton_kernels_fall_back_with_one_warning(monkeypatch):
    """Where the Triton kernels are chosen but fail (e.g. no compiler for the GPU), the
    next backend takes over and a warning says so, once; out-of-memory errors are not
    hidden. (On CPU, Triton is chosen in its interpreter without the compiled kernels.)"""
    from mmdwnet.ops import dispatch

    def broken(*args):
        raise RuntimeError('no compiler here')

    monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '0')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(triton_idwconv, 'forward', broken)
    monkeypatch.setattr(dispatch.TRITON, 'failure', None)
    x, weight = _pair(2, 8, 4, 3, 6, 5)
    assert [name for name, why in explain('inhomogeneous_dwconv2d', x, weight)
            if why is None] == ['triton', 'pytorch']
    with pytest.warns(UserWarning) as record:
        first, second = inhomogeneous_dwconv2d(x, weight), inhomogeneous_dwconv2d(x, weight)
    messages = [str(r.message) for r in record if 'Triton' in str(r.message)]
    assert messages == ['mmdwnet: the Triton kernels failed (RuntimeError: no compiler '
                        'here); using the other backends from now on']
    torch.testing.assert_close(first, reference_idwconv(x, weight))
    torch.testing.assert_close(second, first)
    assert dict(explain('inhomogeneous_dwconv2d', x, weight))['triton'] == (
        'failed earlier in this process: RuntimeError: no compiler here')

    def out_of_memory(*args):
        raise torch.OutOfMemoryError('out of memory')

    monkeypatch.setattr(triton_idwconv, 'forward', out_of_memory)
    monkeypatch.setattr(dispatch.TRITON, 'failure', None)
    with pytest.raises(torch.OutOfMemoryError):
        inhomogeneous_dwconv2d(x, weight)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    x, weight = _pair(2, 16, 4, 7, 9, 9)
    x.requires_grad_()
    weight.requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        y = inhomogeneous_dwconv2d(x, weight)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    y_ref = reference_idwconv(x.detach().to(dtype).double(), weight.detach().to(dtype).double())
    # accumulated in float32, rounded once: within a unit in the last place of the result
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


def test_bad_input():
    x, weight = _pair(1, 4, 2, 3, 5, 5)
    with pytest.raises(ValueError,
                       match=r'`input` must be a 4-D .* got a tensor of shape \(4, 5, 5\)'):
        inhomogeneous_dwconv2d(x[0], weight)
    with pytest.raises(ValueError, match=r'`weight` must be a 6-D .*\(1, 2, 9, 5, 5\)'):
        inhomogeneous_dwconv2d(x, weight.flatten(2, 3))
    with pytest.raises(ValueError, match=r'G dividing C, got weight shape \(1, 3, 3, 3, 5, 5\)'):
        inhomogeneous_dwconv2d(x, torch.randn(1, 3, 3, 3, 5, 5))
    with pytest.raises(ValueError, match=r'got weight shape \(1, 2, 3, 3, 4, 5\)'):
        inhomogeneous_dwconv2d(x, torch.randn(1, 2, 3, 3, 4, 5))
    with pytest.raises(TypeError, match='same dtype, got torch.float32 and torch.float64'):
        inhomogeneous_dwconv2d(x, weight.double())


_MEMORY_SCRIPT = textwrap.dedent('''
    import json, re
    import torch
    from analysis_tools.clean_process import CleanProcess
    from mmdwnet.ops import explain, inhomogeneous_dwconv2d, triton_idwconv
    from mmdwnet.testing.reference import idwconv as reference_idwconv

    def resident_kib(field):  # VmRSS: now, VmHWM: peak since the last reset
        with open('/proc/self/status') as f:
            return int(re.search(field + r':\\s+(\\d+)', f.read()).group(1))

    def peak_extra(impl, dtype):  # the forward pass's growth of the resident set
        fn = dict(op=inhomogeneous_dwconv2d, reference=reference_idwconv)[impl]
        dtype = getattr(torch, dtype)
        fn(torch.randn(2, 4, 8, 8, dtype=dtype), torch.randn(2, 2, 7, 7, 8, 8, dtype=dtype))
        x = torch.randn(2, 96, 112, 112, dtype=dtype)
        w = torch.randn(2, 32, 7, 7, 112, 112, dtype=dtype)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak resident set size to the current one
        before = resident_kib('VmRSS')
        with torch.no_grad():
            y = fn(x, w)
        return (resident_kib('VmHWM') - before) * 1024 / y.nbytes

    torch.set_num_threads(1)
    with CleanProcess() as clean:  # each measurement in a process that ran nothing before
        print(json.dumps({f'{impl} {dtype}': clean.call(peak_extra, impl, dtype)
                         for impl, dtype in [('op', 'float32'), ('op', 'bfloat16'),
                                             ('reference', 'float32')]}))
''')


@pytest.fixture(scope='module')
def peak_extra_memory():
    """The peak growth of the resident set during the forward pass, over the output's size,
    of the operator (float32, bfloat16) and of the unfold reference (float32), each
    measured in a child of one fresh process (Linux /proc; glibc's malloc returning
    freed blocks to the system at once: see analysis_tools.clean_process)."""
    out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT], check=True,
                         capture_output=True, text=True, env=tools_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_forward_peak_memory_within_twice_the_output(dtype, peak_extra_memory):
    extra = peak_extra_memory[f'op {dtype}']
    assert extra < 2.0, f'peak extra memory {extra:.2f}x the output'


@pytest.mark.slow
def test_memory_measurement_sees_unfolded_inputs(peak_extra_memory):
    # the same measurement of the unfold reference shows its K*K-times larger buffers
    assert peak_extra_memory['reference float32'] > 40


def test_registered_custom_ops_pass_opcheck():
    # schema, fake (meta) kernels and autograd registration of the named operators
    x, weight = _pair(2, 8, 4, 3, 5, 6, dtype=torch.float64)
    grad = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    ops = torch.ops.mmdwnet
    torch.library.opcheck(ops.inhomogeneous_dwconv2d.default,
                          (x.requires_grad_(), weight.requires_grad_()))
    torch.library.opcheck(ops.inhomogeneous_dwconv2d_grad_input.default, (grad, weight.detach()))
    torch.library.opcheck(ops.inhomogeneous_dwconv2d_grad_weight.default,
                          (grad, x.detach(), 4, 3))


@pytest.mark.slow
def test_forward_backward_peak_memory_is_a_fifth_of_unfold(tmp_path):
    """tools/benchmark_op.py's peak-memory measurement (each implementation in a clean
    process) at the stage-1 shape with B=2: forward + backward within 1/5 of the unfold
    implementation's."""
    run_tool('benchmark_op.py', '--batch-size', '2', '--threads', '1', '--repeats', '1',
             '--json', str(tmp_path / 'op.json'))
    rows = json.loads((tmp_path / 'op.json').read_text())['rows']
    peaks = {impl: rows[impl]['peak_mem_mb'] for impl in ('mmdwnet', 'unfold')}
    # the operator needs little more than the gradients themselves: grad of the kernels
    # (2*32*49*56*56 floats = 38.4 MiB) and of the input and the output (2.3 MiB each)
    assert peaks['mmdwnet'] < 60, peaks
    assert peaks['mmdwnet'] * 5 <= peaks['unfold'], peaks


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
@pytest.mark.parametrize('k', [7, 12, 5])
@pytest.mark.parametrize('shape', [(2, 24, 8, 9, 10), (2, 24, 6, 9, 10), (1, 32, 1, 60, 32),
                                   (2, 10, 5, 9, 10), (3, 5, 5, 7, 11), (1, 6, 2, 5, 21)])
def test_compiled_low_precision_kernels(dtype, layout, k, shape, compiled_ops):
    """The compiled kernels take float16/bfloat16 operands (NCHW or channels-last) as they
    are, sum in float32 and round once; a spy shows that they, not the fallback, ran. With
    AVX-512 BF16, bfloat16 pairs taps (even and odd K) and channels (3, 4, 2, 1 and 32 per
    group: the forward pass and the input gradient sum blocks of 3, 4, 2 or 1 channels in
    registers, and with 3 samples of 5 groups a thread prefetches the next sample-group's
    kernels mid-task). The
    third shape splits the output into tiles of 48 and 12 rows; the kernel gradient works
    on 16 lanes a vector, whole and partial (widths 10, 11, 21 and 32)."""
    b, c, g, h, w = shape
    x, weight = _pair(b, c, g, k, h, w, dtype=torch.float64)
    x, weight = x.to(dtype), weight.to(dtype)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight.requires_grad_()
    y = inhomogeneous_dwconv2d(x, weight)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == 'channels_last')
    xr, wr = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference_idwconv(xr, wr)
    gx_ref, gw_ref = torch.autograd.grad(expected, (xr, wr), grad.double())
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
    for got, want in ((y, expected), (gx, gx_ref), (gw, gw_ref)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=2 * eps, atol=2 * eps * scale)
    assert compiled_ops.ran(dtype) == _CPU_OPS, compiled_ops.calls


def test_bfloat16_dot_products_where_the_cpu_has_them_and_they_pay(monkeypatch):
    """The CPU kernels are built for AVX-512 BF16 (bfloat16 pairs of taps and channels in
    VDPBF16PS) where the CPU has it; the fused predict-and-apply kernels use them too except
    on Intel Xeons, where they widen to float32 FMAs (faster there). The bfloat16 tests
    then check the paths this machine runs."""
    from mmdwnet.ops import cpu_extension
    ops = cpu_extension.load()
    assert ops is not None, cpu_extension.error()
    flags, vendor = cpu_extension.cpu_flags(), cpu_extension.cpu_vendor()
    has = torch.backends.cpu.get_cpu_capability() == 'AVX512' and 'avx512_bf16' in flags
    if 'MMDWNET_BF16_DOT' not in os.environ:
        assert ops.bf16_dot_products() == has
        assert ops.fused_bf16_dot_products() == (has and vendor != 'GenuineIntel')
    monkeypatch.delenv('MMDWNET_BF16_DOT', raising=False)
    bf16 = {'avx512f', 'avx512_bf16'}
    plan = cpu_extension.bf16_dot_products
    assert plan(bf16, 'AuthenticAMD') == (True, True)
    assert plan(bf16 | {'amx_bf16'}, 'GenuineIntel') == (True, False)
    assert plan({'avx512f'}, 'AuthenticAMD') == (False, False)
    monkeypatch.setenv('MMDWNET_BF16_DOT', '1')
    assert plan(bf16, 'GenuineIntel') == (True, True)
    monkeypatch.setenv('MMDWNET_BF16_DOT', '0')
    assert plan(bf16, 'AuthenticAMD') == (False, False)
    monkeypatch.setenv('MMDWNET_BF16_DOT', 'yes')
    with pytest.raises(ValueError, match="MMDWNET_BF16_DOT must be '0' or '1', got 'yes'"):
        plan(bf16, 'AuthenticAMD')


def test_vector_width_of_the_build(monkeypatch):
    """AVX-512 builds on Intel CPUs work on 512-bit vectors along the rows, others on
    256-bit ones; MMDWNET_VEC_BYTES forces the width (and names a separate build). The
    tests then check the width this machine runs."""
    from mmdwnet.ops import cpu_extension
    ops = cpu_extension.load()
    assert ops is not None, cpu_extension.error()
    if torch.backends.cpu.get_cpu_capability() == 'AVX512':
        assert ops.vector_bytes() == cpu_extension.vector_bytes()
        if 'MMDWNET_VEC_BYTES' not in os.environ:
            assert ops.vector_bytes() == (64 if cpu_extension.cpu_vendor() == 'GenuineIntel'
                                          else 32)
    else:
        assert ops.vector_bytes() == 32
    monkeypatch.delenv('MMDWNET_VEC_BYTES', raising=False)
    width = cpu_extension.vector_bytes
    assert width({'avx512f', 'avx2'}, 'GenuineIntel') == 64
    assert width({'avx512f', 'avx2'}, 'AuthenticAMD') == 32
    assert width({'avx2'}, 'GenuineIntel') == 32
    monkeypatch.setenv('MMDWNET_VEC_BYTES', '32')
    assert width({'avx512f'}, 'GenuineIntel') == 32
    monkeypatch.setenv('MMDWNET_VEC_BYTES', '16')
    with pytest.raises(ValueError, match="MMDWNET_VEC_BYTES must be '32' or '64', got '16'"):
        width({'avx512f'}, 'GenuineIntel')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('k', [3, 7])
def test_channels_last_samples_shared_by_threads(dtype, k):
    """The compiled kernels read and write channels-last maps through NCHW planes of one
    sample, transposed back for the groups a thread computed. 3 samples of 3 groups split
    between 2 threads, so that both work on the middle one: the same sums as from NCHW
    maps, equal bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, weight = _pair(3, 9, 3, k, 7, 11, dtype=torch.float64)
        x, weight = x.to(dtype), weight.to(dtype)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout).requires_grad_()
            wl = weight.clone().requires_grad_()
            y = inhomogeneous_dwconv2d(xl, wl)
            gx, gw = torch.autograd.grad(y, (xl, wl), grad.contiguous(memory_format=layout))
            assert y.is_contiguous(memory_format=layout)
            results.append((y, gx, gw))
    finally:
        torch.set_num_threads(threads)
    for name, nchw, channels_last in zip(('output', 'input grad', 'kernel grad'), *results):
        assert torch.equal(nchw, channels_last), name


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_compiled_kernels_transpose_channels_last_maps_exactly(dtype, compiled_ops):
    """Identity kernels (1 at the centre tap): the output is the input and the input
    gradient the output gradient, bit for bit, through the compiled kernels' transposes of
    channels-last maps (8 x 8 tiles, 2- and 4-byte types in vector registers; 20 channels
    and 99 pixels leave partial tiles of both)."""
    b, c, g, k, h, w = 3, 20, 5, 5, 9, 11
    gen = torch.Generator().manual_seed(1)
    x, grad = (torch.randn(b, c, h, w, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    weight = torch.zeros(b, g, k, k, h, w, dtype=dtype)
    weight[:, :, k // 2, k // 2] = 1
    x.requires_grad_()
    y = inhomogeneous_dwconv2d(x, weight)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x.detach())
    assert torch.equal(torch.autograd.grad(y, x, grad)[0], grad)
    assert {'inhomogeneous_dwconv2d',
            'inhomogeneous_dwconv2d_grad_input'} <= compiled_ops.ran(dtype), compiled_ops.calls
