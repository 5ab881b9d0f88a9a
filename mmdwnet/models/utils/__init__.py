from .drop_path import residual_drop_path
from .dynamic_dwconv import ChannelSharedDWConv, DynamicDWConv, InhomogeneousDynamicDWConv
from .ffn import DWFFN
from .fuse_bn import bn_affine, fold_bn_after, fold_bn_before_linear, is_foldable
from .fused_layers import Conv2dAdd, Conv2dReLU, LinearAdd, LinearGELU, add_branch
from .norm import CenteringCalibratedBN
from .patch_merging import ChannelsLastPatchMerging
from .pretrained import load_pretrained_backbone, missing_pretrained_checkpoint

__all__ = [
    'DynamicDWConv', 'InhomogeneousDynamicDWConv', 'ChannelSharedDWConv',
    'bn_affine', 'fold_bn_after', 'fold_bn_before_linear', 'is_foldable',
    'CenteringCalibratedBN', 'ChannelsLastPatchMerging', 'Conv2dAdd', 'Conv2dReLU',
    'LinearAdd', 'LinearGELU', 'add_branch', 'DWFFN',
    'load_pretrained_backbone', 'missing_pretrained_checkpoint', 'residual_drop_path'
]
