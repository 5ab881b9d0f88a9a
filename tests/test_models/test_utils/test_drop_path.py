"""The residual addition with drop path (mmdwnet/models/utils/drop_path.py)."""

import pytest
import torch


@pytest.mark.parametrize('drop_prob', [0., 0.3])
def test_residual_drop_path_equals_mmcv(drop_prob):
    """residual_drop_path(identity, x, DropPath) is identity + DropPath(x): the same masks
    from the same random numbers (and the same generator state after), the same gradients;
    in eval mode and for other modules the module as it is."""
    from mmcv.cnn.bricks.drop import DropPath

    from mmdwnet.models.utils import residual_drop_path
    drop = DropPath(drop_prob).train()
    identity, x = torch.randn(8, 4, 3, 5), torch.randn(8, 4, 3, 5)
    ia, xa = identity.clone().requires_grad_(), x.clone().requires_grad_()
    ib, xb = identity.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ours = residual_drop_path(ia, xa, drop)
    after_ours = torch.rand(1)
    torch.manual_seed(1)
    theirs = ib + drop(xb)
    after_theirs = torch.rand(1)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(after_ours, after_theirs)
    if drop_prob:  # some samples dropped, the others scaled
        dropped = (theirs - ib).flatten(1).abs().sum(1) == 0
        assert 0 < dropped.sum() < 8
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ia.grad, ib.grad)
    drop.eval()
    torch.testing.assert_close(residual_drop_path(identity, x, drop), identity + x, rtol=0,
                               atol=0)
    other = residual_drop_path(identity, x, torch.nn.Sequential(torch.nn.Identity()))
    torch.testing.assert_close(other, identity + x, rtol=0, atol=0)
