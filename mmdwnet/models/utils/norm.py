"""Centering-calibrated BatchNorm (the centering calibration of "Representative Batch
Normalization", Gao et al., CVPR 2021), used by the paper's normalisation ablation
(Table 12: DW-Conv with LN 81.2, BN 81.3, centering-calibrated BN 81.7)."""
import torch
from torch import Tensor, nn

from mmdwnet.registry import MODELS


@MODELS.register_module('CCBN')
class CenteringCalibratedBN(nn.BatchNorm2d):
    """BatchNorm preceded by adding a learned per-channel weight times each instance's
    channel mean: ``BN(x + w_c * mean_{h,w}(x[b, c]))``, with ``w`` starting at zero (so
    training starts from plain BN). Only the centering calibration is used, as the
    ablation describes; RBN's scaling calibration after the norm is not.

    Use it through ``norm_cfg=dict(type='CCBN')``. It cannot be folded into an adjacent
    layer for inference (the calibration depends on the instance), so
    ``switch_to_deploy`` keeps it.

    Args:
        num_features (int): Channels C.
        **kwargs: Arguments of :class:`torch.nn.BatchNorm2d` (``eps``, ``momentum``...).
    """
    _abbr_ = 'bn'
    foldable = False

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.centering_weight = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        return super().forward(x + self.centering_weight.view(1, -1, 1, 1) * mean)
