"""Folding inference-mode BatchNorm into the adjacent convolution or linear layer.

A BatchNorm in eval mode is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``; next to a
linear operator it can be merged into that operator's weight and bias.

mmcv's ``fuse_conv_bn`` pairs a BatchNorm with whichever convolution was registered before
it; in a DWNet block that would fold norms that do not follow that convolution (the FFN's
input norm after the optional extra depth-wise convolution, centering-calibrated BN), and
it cannot fold into dynamic kernels or a following linear layer. So each block names its
pairs (``DWBlock.switch_to_deploy``) and uses these helpers.
"""
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_foldable(norm: nn.Module) -> bool:
    """BatchNorm (any flavour, SyncBN included) that tracks running statistics and is a
    per-channel affine map in eval mode (not e.g. :class:`CenteringCalibratedBN`, which
    sets ``foldable = False``)."""
    return isinstance(norm, _BatchNorm) and getattr(norm, 'foldable', True) and \
        norm.track_running_stats and norm.running_mean is not None


def bn_affine(norm: _BatchNorm) -> Tuple[Tensor, Tensor]:
    """``(s, t)`` with ``norm(x) == s * x + t`` (per channel) in eval mode."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.affine:
        shift = shift + norm.bias
    return scale.detach(), shift.detach()


def _with_bias(layer: nn.Module) -> nn.Module:
    if layer.bias is None:
        out_features = layer.weight.shape[0]
        layer.bias = nn.Parameter(layer.weight.new_zeros(out_features))
    return layer


@torch.no_grad()
def fold_bn_after(module: nn.Module, layer: str, norm: str) -> bool:
    """If the norm ``module.<norm>`` is foldable (:func:`is_foldable`), fold it into the
    convolution ``module.<layer>`` it follows (``norm(layer(x)) == layer'(x)``) and
    replace it by an identity. Returns whether it did."""
    bn = getattr(module, norm)
    if not is_foldable(bn):
        return False
    scale, shift = bn_affine(bn)
    conv = _with_bias(getattr(module, layer))
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias.mul_(scale).add_(shift)
    setattr(module, norm, nn.Identity())
    return True


@torch.no_grad()
def fold_bn_before_linear(module: nn.Module, norm: str, linear: nn.Linear) -> bool:
    """If the norm ``module.<norm>`` is foldable, fold it into ``linear``, which it
    precedes over the same channels (``linear(norm(x)) == linear'(x)``), and replace it by
    an identity. Returns whether it did."""
    bn = getattr(module, norm)
    if not is_foldable(bn):
        return False
    scale, shift = bn_affine(bn)
    linear = _with_bias(linear)
    linear.bias.add_(linear.weight @ shift)
    linear.weight.mul_(scale.view(1, -1))
    setattr(module, norm, nn.Identity())
    return True
