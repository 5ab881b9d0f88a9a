"""The dynamic and channel-shared depth-wise convolution layers of DWNet's blocks.

Each predicts (or shares) its kernels and applies them with a functional operator of
:mod:`mmdwnet.ops`.
"""
from typing import Dict, Optional

import torch
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.ops import depthwise_conv2d, predicted_idwconv2d
from .fuse_bn import bn_affine, fold_bn_after, is_foldable
from .fused_layers import Conv2dReLU, linear


class _KernelPredictor(BaseModule):
    """What the dynamic layers share: the kernels of size K are predicted by 1x1 conv
    C -> C/r, norm, ReLU, 1x1 conv C/r -> ``kernels * K * K`` (the attribute names are the
    checkpoints' keys), and the predictor's BatchNorm folds into ``conv1`` for inference.

    Args:
        channels (int): Input and output channels C.
        kernels (int): Kernels predicted per sample (or per position).
        kernel_size (int): Kernel size K.
        reduction (int): Channel reduction r of the kernel predictor.
        norm_cfg (dict): Norm layer of the kernel predictor.
        conv1_bias (bool): Whether the first 1x1 convolution has a bias.
        init_cfg (dict, optional): Initialization config.
    """

    def __init__(self, channels: int, kernels: int, kernel_size: int, reduction: int,
                 norm_cfg: Dict, conv1_bias: bool, init_cfg: Optional[Dict]):
        super().__init__(init_cfg=init_cfg)
        self.kernel_size = kernel_size
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1, bias=conv1_bias)
        self.norm = build_norm_layer(norm_cfg, channels // reduction)[1]
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels // reduction, kernels * kernel_size**2, 1)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fold the predictor's BatchNorm into ``conv1``."""
        fold_bn_after(self, 'conv1', 'norm')

    def _normalise(self, hidden: Tensor) -> Tensor:
        """``self.norm`` on the (B, C/r, H, W) predictor activations (H = W = 1 for D-DW),
        with a clear error where a training BatchNorm would see one value per channel."""
        if (self.norm.training and hidden.shape[0] * hidden.shape[2] * hidden.shape[3] == 1
                and isinstance(self.norm, _BatchNorm)
                and not isinstance(self.norm, nn.SyncBatchNorm)):
            what = ('one pooled vector per image' if isinstance(self, DynamicDWConv) else
                    'one vector per position')
            raise ValueError(
                f'{type(self).__name__}: the kernel predictor normalises {what} with '
                f'{type(self.norm).__name__}, which in training mode needs more than one '
                f'value per channel, and got a batch of 1 (predictor input '
                f'{tuple(hidden.shape)}). Use 2 or more images per device, SyncBN across '
                "devices (norm_cfg=dict(type='SyncBN')), norm_eval=True to keep the "
                'BatchNorms in eval mode, or a predictor norm that needs no batch: '
                "DWNet(predictor_norm_cfg=dict(type='GN', num_groups=1))")
        return self.norm(hidden)


class DynamicDWConv(_KernelPredictor):
    """Homogeneous dynamic depth-wise convolution (D-DW-Conv).

    One K x K kernel per channel and sample, predicted from the globally pooled input
    (pool, 1x1 conv C -> C/r, norm, ReLU, 1x1 conv C/r -> C*K*K) and shared by all
    positions, plus a learned per-channel bias (zero at start).

    Args:
        channels (int): Input and output channels C.
        kernel_size (int): Kernel size K. Defaults to 7.
        reduction (int): Channel reduction r of the kernel predictor. Defaults to 4.
        norm_cfg (dict): Norm layer of the kernel predictor. Defaults to ``dict(type='BN')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 channels: int,
                 kernel_size: int = 7,
                 reduction: int = 4,
                 norm_cfg: Dict = dict(type='BN'),
                 init_cfg: Optional[Dict] = None):
        super().__init__(channels, channels, kernel_size, reduction, norm_cfg,
                         conv1_bias=False, init_cfg=init_cfg)
        self.channels = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        # the 1x1 convolutions act on pooled (B, C) vectors: run them as matrix products
        # (same parameters), much faster than convolutions on 1x1 maps, above all backward
        hidden = linear(self.pool(x).flatten(1), self.conv1.weight.flatten(1),
                        self.conv1.bias)
        hidden = self.act(self._normalise(hidden[:, :, None, None])).flatten(1)
        weight = linear(hidden, self.conv2.weight.flatten(1), self.conv2.bias)
        weight = weight.reshape(b, c, self.kernel_size, self.kernel_size)
        return depthwise_conv2d(x, weight, self.bias)

    @torch.no_grad()
    def switch_to_deploy(self, out_norm: Optional[nn.Module] = None) -> bool:
        """Fold the predictor's BatchNorm into ``conv1`` and, when given, a BatchNorm
        applied to this operator's output into the predicted kernels and the bias.
        Returns whether ``out_norm`` was folded."""
        super().switch_to_deploy()
        if out_norm is None or not is_foldable(out_norm):
            return False
        scale, shift = bn_affine(out_norm)
        per_tap = scale.repeat_interleave(self.kernel_size**2)  # conv2 rows are c*K*K + k
        self.conv2.weight.mul_(per_tap.view(-1, 1, 1, 1))
        self.conv2.bias.mul_(per_tap)
        self.bias.mul_(scale).add_(shift)
        return True


class InhomogeneousDynamicDWConv(_KernelPredictor):
    """Inhomogeneous dynamic depth-wise convolution (I-D-DW-Conv, "involution").

    A K x K kernel per position and group of ``group_channels`` channels, predicted from
    the feature at that position (1x1 conv C -> C/r with bias, norm, ReLU, 1x1 conv
    C/r -> G*K*K), then applied by :func:`mmdwnet.ops.inhomogeneous_dwconv2d`. No bias.
    Prediction and application are one operator, :func:`mmdwnet.ops.predicted_idwconv2d`,
    which never stores the large kernel tensor. Its predictor's BatchNorm folds into
    ``conv1`` (:meth:`switch_to_deploy`); a per-channel norm after it cannot fold into
    kernels that the channels of a group share, and is applied by the operator instead.

    Args:
        channels (int): Input and output channels C.
        kernel_size (int): Kernel size K. Defaults to 7.
        group_channels (int): Channels sharing one predicted kernel; G = C / group_channels.
        reduction (int): Channel reduction r of the kernel predictor. Defaults to 4.
        norm_cfg (dict): Norm layer of the kernel predictor. Defaults to ``dict(type='BN')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 channels: int,
                 kernel_size: int = 7,
                 group_channels: int = 1,
                 reduction: int = 4,
                 norm_cfg: Dict = dict(type='BN'),
                 init_cfg: Optional[Dict] = None):
        super().__init__(channels, channels // group_channels, kernel_size, reduction,
                         norm_cfg, conv1_bias=True, init_cfg=init_cfg)
        self.groups = channels // group_channels
        # the output norm and ReLU, once switch_to_deploy has taken them over
        self.register_buffer('out_scale', None)
        self.register_buffer('out_shift', None)
        self.out_relu = False

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self._normalise(self.conv1(x)))
        # one operator predicts the (B, G, K, K, H, W) kernels - 16x the size of x at the
        # paper's settings - a few samples at a time and applies them, and predicts them
        # again in the backward pass instead of storing them; in deploy form it also
        # applies the output norm and ReLU this layer took over
        return predicted_idwconv2d(x, hidden, self.conv2.weight.flatten(1), self.conv2.bias,
                                   self.kernel_size, self.out_scale, self.out_shift,
                                   relu=self.out_relu)

    @torch.no_grad()
    def switch_to_deploy(self, out_norm: Optional[nn.Module] = None,
                         out_act: Optional[nn.Module] = None) -> bool:
        """Fold the predictor's BatchNorm into ``conv1``; where it folded, ``conv1`` and
        the ReLU become one :class:`Conv2dReLU` (same parameters and keys). Where
        ``out_norm`` (the BatchNorm after this layer) is foldable and ``out_act`` a ReLU,
        take both over as buffers ``out_scale`` and ``out_shift`` and a ReLU, which the
        operator's fused CPU kernel applies to its sums before it writes them (they
        cannot fold into kernels that a group's channels share). Returns whether it took
        them."""
        if fold_bn_after(self, 'conv1', 'norm') and type(self.conv1) is nn.Conv2d:
            self.conv1 = Conv2dReLU.from_conv(self.conv1)
            self.act = nn.Identity()
        if out_norm is None or not is_foldable(out_norm) or type(out_act) is not nn.ReLU:
            return False
        scale, shift = bn_affine(out_norm)
        self.out_scale, self.out_shift = scale.clone(), shift.clone()
        self.out_relu = True
        return True


class ChannelSharedDWConv(BaseModule):
    """Static depth-wise convolution whose K x K kernel is shared inside groups of
    consecutive channels (the paper's Table 4 "sharing across channels and positions",
    with as many groups as Swin has attention heads); the bias stays per channel.

    Args:
        channels (int): Input and output channels C.
        kernel_size (int): Kernel size K.
        groups (int): Kernels G; each is shared by C / G channels.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        if groups < 1 or channels % groups:
            raise ValueError(f'ChannelSharedDWConv: `groups` must divide the {channels} '
                             f'channels, got {groups!r}')
        self.channels, self.groups = channels, groups
        self.weight = nn.Parameter(torch.empty(groups, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        # nn.Conv2d's default initialisation for a depth-wise kernel (fan-in K*K)
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        bound = 1 / kernel_size
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.repeat_interleave(self.channels // self.groups, dim=0)
        return depthwise_conv2d(x, weight, self.bias)
