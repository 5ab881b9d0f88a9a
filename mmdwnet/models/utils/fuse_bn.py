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
def fold_bn_after(layer: nn.Module, norm: _BatchNorm) -> nn.Module:
    """Fold ``norm`` that follows ``layer`` (Conv2d or Linear, output channels first) into
    it: ``norm(layer(x)) == layer'(x)``. Modifies and returns ``layer``."""
    scale, shift = bn_affine(norm)
    layer = _with_bias(layer)
    layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.dim() - 1))))
    layer.bias.mul_(scale).add_(shift)
    return layer


@torch.no_grad()
def fold_bn_before_linear(norm: _BatchNorm, linear: nn.Linear) -> nn.Linear:
    """Fold ``norm`` that precedes ``linear`` over the same channels:
    ``linear(norm(x)) == linear'(x)``. Modifies and returns ``linear``."""
    scale, shift = bn_affine(norm)
    linear = _with_bias(linear)
    linear.bias.add_(linear.weight @ shift)
    linear.weight.mul_(scale.view(1, -1))
    return linear
