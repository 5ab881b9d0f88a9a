"""The block and the stage of DWNet (:class:`mmdwnet.models.backbones.DWNet`)."""
from typing import Dict, Optional, Sequence

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmengine.model import BaseModule, ModuleList
from torch import Tensor, nn

from mmdwnet.models.utils import (DWFFN, ChannelSharedDWConv, ChannelsLastPatchMerging, Conv2dAdd,
                                  Conv2dReLU, DynamicDWConv, InhomogeneousDynamicDWConv,
                                  add_branch, fold_bn_after)
from mmdwnet.ops import DepthwiseConv2d

CONV_TYPES = ('dw', 'ddw', 'iddw')


class DWBlock(BaseModule):
    """One DWNet block: a depth-wise convolution half and an FFN half, each residual.

    Spatial half: 1x1 conv, norm, ReLU, K x K depth-wise operator, norm, ReLU, 1x1 conv,
    norm. Channel half: norm, then Linear C -> ``mlp_ratio`` * C, GELU, Linear back.

    Args:
        embed_dims (int): Channels C.
        conv_type (str): K x K operator: ``'dw'``, ``'ddw'`` or ``'iddw'``. Defaults to 'dw'.
        kernel_size (int): Kernel size K. Defaults to 7.
        group_channels (int): Channels per dynamic-kernel group (``'iddw'`` only).
            Defaults to 1.
        mlp_ratio (float): Hidden width of the FFN relative to C. Defaults to 4.
        drop_path_rate (float): Stochastic depth rate of both halves. Defaults to 0.
        norm_cfg (dict): Norm layers of the block. Defaults to ``dict(type='BN')``.
        predictor_norm_cfg (dict, optional): Norm layer of the dynamic kernel predictor
            (``'ddw'``, ``'iddw'``). Defaults to None (``norm_cfg``).
        act_cfg (dict): Activation of the FFN. Defaults to ``dict(type='GELU')``.
        with_cp (bool): Use gradient checkpointing. Defaults to False.
        se_ratio (int, optional): Ablation (Table 15): a squeeze-and-excitation layer
            (MMPretrain's ``SELayer``, squeeze channels C / ``se_ratio`` rounded up to a
            multiple of 8) after the depth-wise operator's norm and ReLU. Defaults to None.
        extra_dw (bool): Ablation (Table 6, I-D-DW + DW): a residual static depth-wise
            convolution with a norm in front, ``x + DW(norm(x))``, between the two halves,
            as Shuffle Transformer's neighbour-window connection. Defaults to False.
        shared_kernel_groups (int, optional): Ablation (Table 4): ``'dw'`` kernels shared
            by groups of channels, this many groups. Defaults to None (one per channel).
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 conv_type: str = 'dw',
                 kernel_size: int = 7,
                 group_channels: int = 1,
                 mlp_ratio: float = 4.,
                 drop_path_rate: float = 0.,
                 norm_cfg: Dict = dict(type='BN'),
                 predictor_norm_cfg: Optional[Dict] = None,
                 act_cfg: Dict = dict(type='GELU'),
                 with_cp: bool = False,
                 se_ratio: Optional[int] = None,
                 extra_dw: bool = False,
                 shared_kernel_groups: Optional[int] = None,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp
        self.pw_conv1 = nn.Conv2d(embed_dims, embed_dims, 1, bias=False)
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        if shared_kernel_groups is not None:
            if conv_type != 'dw':
                raise ValueError('DWBlock: `shared_kernel_groups` applies to conv_type '
                                 f"'dw' only, got conv_type={conv_type!r}")
            self.dw_conv = ChannelSharedDWConv(embed_dims, kernel_size, shared_kernel_groups)
        elif conv_type == 'dw':
            self.dw_conv = DepthwiseConv2d(embed_dims, kernel_size)
        elif conv_type == 'ddw':
            self.dw_conv = DynamicDWConv(embed_dims, kernel_size,
                                         norm_cfg=predictor_norm_cfg or norm_cfg)
        elif conv_type == 'iddw':
            self.dw_conv = InhomogeneousDynamicDWConv(
                embed_dims, kernel_size, group_channels, norm_cfg=predictor_norm_cfg or norm_cfg)
        else:
            raise ValueError(f'DWBlock: `conv_type` must be one of {CONV_TYPES}, '
                             f'got {conv_type!r}')
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.se = nn.Identity()
        if se_ratio is not None:
            from mmpretrain.models.utils import SELayer
            self.se = SELayer(embed_dims, ratio=se_ratio)
        self.pw_conv2 = nn.Conv2d(embed_dims, embed_dims, 1, bias=False)
        self.norm3 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)
        self.drop_path = build_dropout(dict(type='DropPath', drop_prob=drop_path_rate))

        self.extra_dw = extra_dw
        if extra_dw:
            self.local_norm = build_norm_layer(norm_cfg, embed_dims)[1]
            self.local_conv = DepthwiseConv2d(embed_dims, kernel_size)

        self.ffn_norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.ffn = DWFFN(
            embed_dims=embed_dims,
            feedforward_channels=int(embed_dims * mlp_ratio),
            act_cfg=act_cfg,
            dropout_layer=dict(type='DropPath', drop_prob=drop_path_rate))

    def forward(self, x: Tensor) -> Tensor:

        def _inner_forward(x):
            y = self.act1(self.norm1(self.pw_conv1(x)))
            y = self.se(self.act2(self.norm2(self.dw_conv(y))))
            x = add_branch(x, self.pw_conv2, y, self.norm3, self.drop_path)
            if self.extra_dw:
                x = x + self.local_conv(self.local_norm(x))
            # the FFN works on (B, H, W, C); the identity is added inside it
            y = self.ffn(self.ffn_norm(x).permute(0, 2, 3, 1), x.permute(0, 2, 3, 1))
            return y.permute(0, 3, 1, 2)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fold every BatchNorm (with its running statistics) into the adjacent
        convolution or linear layer and replace it by an identity; norms of other kinds
        stay. Where their norms folded, the first 1x1 convolution and its ReLU become one
        :class:`Conv2dReLU` and the last and the residual addition one :class:`Conv2dAdd`;
        the I-D-DW layer takes its output norm and ReLU, which its CPU kernel applies to
        its sums; the FFN fuses its layers (:meth:`DWFFN.switch_to_deploy`). Parameters
        keep their keys. The block then computes the same function in eval mode, faster."""
        if fold_bn_after(self, 'pw_conv1', 'norm1') and type(self.pw_conv1) is nn.Conv2d:
            self.pw_conv1 = Conv2dReLU.from_conv(self.pw_conv1)
            self.act1 = nn.Identity()
        if isinstance(self.dw_conv, nn.Conv2d):
            fold_bn_after(self, 'dw_conv', 'norm2')
        elif isinstance(self.dw_conv, DynamicDWConv):
            if self.dw_conv.switch_to_deploy(self.norm2):
                self.norm2 = nn.Identity()
        elif isinstance(self.dw_conv, InhomogeneousDynamicDWConv):
            if self.dw_conv.switch_to_deploy(self.norm2, self.act2):
                self.norm2, self.act2 = nn.Identity(), nn.Identity()
        # channel-shared kernels cannot take a per-channel scale: norm2 stays
        if fold_bn_after(self, 'pw_conv2', 'norm3') and type(self.pw_conv2) is nn.Conv2d:
            self.pw_conv2 = Conv2dAdd.from_conv(self.pw_conv2)
        self.ffn.switch_to_deploy(self, 'ffn_norm')


class DWStage(BaseModule):
    """A stage: optional 2x down-sampling (patch merging) followed by DWNet blocks.

    Args:
        in_channels (int): Channels entering the stage.
        embed_dims (int): Channels inside the stage.
        downsample (bool): Start with patch merging (``in_channels`` -> ``embed_dims``).
        drop_path_rates (Sequence[float]): Stochastic depth rate of each block (one block
            per rate).
        block_cfg (dict): Keyword arguments shared by the blocks (see :class:`DWBlock`).
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: int,
                 downsample: bool,
                 drop_path_rates: Sequence[float],
                 block_cfg: Dict,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        # mmcv's PatchMerging (LN + bias-free Linear) gathers each 2x2 neighbourhood in
        # nn.Unfold's channel order, c * 4 + 2 * row + col; the reference code stacks the
        # four positions instead. Weight converters permute accordingly. The channels-last
        # subclass computes the same without nn.Unfold (see its docstring for why).
        self.downsample = ChannelsLastPatchMerging(
            in_channels, embed_dims, norm_cfg=dict(type='LN')) if downsample else None
        self.blocks = ModuleList(
            DWBlock(embed_dims, drop_path_rate=rate, **block_cfg) for rate in drop_path_rates)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            # (B, C, H, W) maps are channels-last in memory: the (B, H*W, C) sequence and
            # back are views, and gradients stay channels-last
            b, c = x.shape[:2]
            x, (h, w) = self.downsample(x.permute(0, 2, 3, 1).reshape(b, -1, c), x.shape[2:])
            x = x.view(b, h, w, -1).permute(0, 3, 1, 2)
        for block in self.blocks:
            x = block(x)
        return x
