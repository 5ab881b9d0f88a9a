"""The FFN's linear-GELU-linear for training on CPU: the compiled GELU-with-derivative
kernel against float64 GELU and its autograd derivative; ``gelu_mlp``'s output and all
five gradients against float64 autograd through the standard layers; where it falls back
to them (and then equals them exactly); and a spy that shows which path ran."""
import pytest
import torch
import torch.nn.functional as F

from mmdwnet.ops import cpu_extension, gelu_mlp


def _gelu_and_derivative_float64(x):
    x = x.detach().double().requires_grad_()
    y = F.gelu(x)
    derivative, = torch.autograd.grad(y.sum(), x)
    return y.detach(), derivative


def test_gelu_with_derivative_kernel():
    ops = cpu_extension.load()
    assert ops is not None, cpu_extension.error()
    # the whole range: both signs, 0, the erf tails, where exp(-x^2 / 2) underflows
    # (|x| > 13.2) and lengths that leave vector remainders
    x = torch.cat([torch.linspace(-30, 30, 100003), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    expected, expected_derivative = _gelu_and_derivative_float64(x)
    values = x.clone()
    derivative = ops.gelu_with_derivative_(values)  # in place: values := GELU(x)
    # A&S 7.1.26 erf (|error| < 1.5e-7) and float32 rounding, times |x| for GELU: as close
    # as PyTorch's own float32 F.gelu and its gradient (2.5e-7 here)
    tolerance = 3e-7 * (1 + x.double().abs())
    assert ((values.double() - expected).abs() <= tolerance).all()
    assert ((derivative.double() - expected_derivative).abs() <= tolerance).all()
    # exactly 0 (no subnormals) where exp(-x^2 / 2) leaves float32's normal range
    assert values[x < -13.2].eq(0).all() and derivative[x < -13.2].eq(0).all()
    assert values[x > 14].eq(x[x > 14]).all() and derivative[x > 14].eq(1).all()


def test_gelu_with_derivative_kernel_errors():
    ops = cpu_extension.load()
    with pytest.raises(RuntimeError, match='float32 CPU tensor, got Double'):
        ops.gelu_with_derivative_(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match='must be contiguous'):
        ops.gelu_with_derivative_(torch.zeros(3, 4).t())


def _operands(shape, c_in, hidden, c_out, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, c_in, generator=gen)
    w1 = torch.randn(hidden, c_in, generator=gen) / c_in**0.5
    b1 = torch.randn(hidden, generator=gen) if bias else None
    w2 = torch.randn(c_out, hidden, generator=gen) / hidden**0.5
    b2 = torch.randn(c_out, generator=gen) if bias else None
    return [x, w1, b1, w2, b2]


def _standard(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize('bias', [True, False])
# (B, H, W, C) as in the blocks, a flat batch, and sizes off the vector width
@pytest.mark.parametrize('shape,c_in,hidden,c_out', [((2, 5, 7), 24, 96, 24),
                                                     ((37, ), 13, 29, 11)])
def test_matches_float64_autograd(shape, c_in, hidden, c_out, bias, compiled_ops):
    operands = [t if t is None else t.requires_grad_()
                for t in _operands(shape, c_in, hidden, c_out, bias)]
    grad = torch.randn(*shape, c_out, generator=torch.Generator().manual_seed(1))
    out = gelu_mlp(*operands)
    out.backward(grad)
    assert compiled_ops.ran(torch.float32) == {'gelu_with_derivative_'}

    reference = [t if t is None else t.detach().double().requires_grad_() for t in operands]
    expected = _standard(*reference)
    expected.backward(grad.double())
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(operands, reference):
        if got is None:
            continue
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('trainable', [(0, ), (1, 2), (3, 4), (0, 3)])
def test_only_the_gradients_asked_for(trainable, compiled_ops):
    operands = _operands((4, 6), 8, 32, 8)
    for i in trainable:
        operands[i].requires_grad_()
    gelu_mlp(*operands).sum().backward()
    assert compiled_ops.ran() == {'gelu_with_derivative_'}
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in operands]
    _standard(*reference).sum().backward()
    for i, (got, want) in enumerate(zip(operands, reference)):
        if i in trainable:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
        else:
            assert got.grad is None


def _no_grad(operands):
    with torch.no_grad():
        return gelu_mlp(*operands)


def _autocast(operands):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        return gelu_mlp(*operands)


@pytest.mark.parametrize('case', ['no_grad', 'no_tensor_requires_grad', 'float64', 'autocast',
                                  'extension_disabled'])
def test_falls_back_to_the_standard_layers(case, compiled_ops, monkeypatch):
    operands = _operands((3, 5), 8, 16, 8)
    if case != 'no_tensor_requires_grad':
        operands[0].requires_grad_()
    if case == 'float64':
        operands = [t.double() for t in operands]
    if case == 'extension_disabled':
        monkeypatch.setenv('MMDWNET_CPU_EXTENSION', '0')
    run = {'no_grad': _no_grad, 'autocast': _autocast}.get(case, lambda ops: gelu_mlp(*ops))
    out = run(operands)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=case == 'autocast'):
        expected = _standard(*operands)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert compiled_ops.ran() == set()
