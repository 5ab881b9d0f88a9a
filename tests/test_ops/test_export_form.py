"""The export forms of the operators (standard graph operations only) against the tests'
references, and the switch that selects them."""
import pytest
import torch

from mmdwnet.ops import (depthwise_conv2d, export_mode, in_export_mode, inhomogeneous_dwconv2d,
                         predicted_idwconv2d)
from mmdwnet.ops.export_form import (depthwise_conv_standard, idwconv_shift_add,
                                     predicted_idwconv_shift_add)
from mmdwnet.testing.reference import dwconv as reference_dwconv
from mmdwnet.testing.reference import idwconv as reference_idwconv
from mmdwnet.testing.reference import predicted_idwconv as reference_predicted


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize('k,h,w', [(7, 9, 13), (4, 5, 6), (3, 2, 2), (12, 7, 5)])
def test_shift_add_forms_match_the_references(k, h, w):
    x, weight = _randn(2, 6, h, w), _randn(2, 3, k, k, h, w, seed=1)
    torch.testing.assert_close(idwconv_shift_add(x, weight), reference_idwconv(x, weight))
    hidden, pw, pb = _randn(2, 4, h, w, seed=2), _randn(3 * k * k, 4, seed=3), _randn(3 * k * k)
    torch.testing.assert_close(predicted_idwconv_shift_add(x, hidden, pw, pb, k),
                               reference_predicted(x, hidden, pw, pb, k))
    shared, per_sample, bias = _randn(6, 1, k, k, seed=4), _randn(2, 6, k, k, seed=5), _randn(6)
    torch.testing.assert_close(depthwise_conv_standard(x, shared, bias, True),
                               reference_dwconv(x, shared, bias))
    torch.testing.assert_close(depthwise_conv_standard(x, per_sample, bias, False),
                               reference_dwconv(x, per_sample, bias))


def test_export_mode_switches_the_public_operators(monkeypatch):
    """Inside export_mode the operators run their export forms (spied on), and give the
    same results as outside; the mode nests and is restored after an exception."""
    from mmdwnet.ops import export_form
    calls = []
    for name in ('idwconv_shift_add', 'predicted_idwconv_shift_add',
                 'depthwise_conv_standard'):
        real = getattr(export_form, name)
        monkeypatch.setattr(export_form, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x, weight = _randn(2, 6, 8, 8).float(), _randn(2, 3, 7, 7, 8, 8, seed=1).float()
    hidden, pw, pb = _randn(2, 4, 8, 8).float(), _randn(147, 4).float(), _randn(147).float()
    per_sample, bias = _randn(2, 6, 7, 7).float(), _randn(6).float()
    eager = [inhomogeneous_dwconv2d(x, weight), predicted_idwconv2d(x, hidden, pw, pb, 7),
             depthwise_conv2d(x, per_sample, bias)]
    assert calls == [] and not in_export_mode()
    with export_mode():
        assert in_export_mode()
        exported = [inhomogeneous_dwconv2d(x, weight), predicted_idwconv2d(x, hidden, pw, pb, 7),
                    depthwise_conv2d(x, per_sample, bias)]
        with export_mode():
            pass
        assert in_export_mode()
    # (the predicted form and the per-sample depth-wise form apply their kernels with the
    # plain shift-and-add)
    assert calls == ['idwconv_shift_add', 'predicted_idwconv_shift_add', 'idwconv_shift_add',
                     'depthwise_conv_standard', 'idwconv_shift_add']
    for a, b in zip(eager, exported):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError), export_mode():
        raise RuntimeError
    assert not in_export_mode()


@pytest.mark.parametrize('h,w', [(2, 2), (7, 5), (13, 31), (1, 3)])
@pytest.mark.parametrize('size', [1, 2, 3, 6, (2, 5), (None, 3)])
def test_adaptive_pooling_form_matches_pytorch(h, w, size):
    """UPerNet's pyramid pooling (1, 2, 3, 6) as averaging-matrix products: PyTorch's bins,
    for maps larger and smaller than the output, any size."""
    import torch.nn.functional as F

    from mmdwnet.ops.export_form import ExportableAdaptiveAvgPool2d, adaptive_avg_pool2d_standard
    x = _randn(2, 3, h, w)
    expected = F.adaptive_avg_pool2d(x, size)
    torch.testing.assert_close(adaptive_avg_pool2d_standard(x, size), expected)
    with export_mode():
        torch.testing.assert_close(ExportableAdaptiveAvgPool2d(size)(x), expected)
