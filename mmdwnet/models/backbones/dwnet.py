"""DWNet: the depth-wise convolution networks of "On the Connection between Local
Attention and Dynamic Depth-wise Convolution" (ICLR 2022).

Swin Transformer's layout with every window-attention layer replaced by a depth-wise
convolution block (:mod:`.dwnet_block`): static (``'dw'``), homogeneous dynamic (``'ddw'``)
or inhomogeneous dynamic (``'iddw'``).
"""
from copy import deepcopy
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule, ModuleList
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.models.utils import load_pretrained_backbone, missing_pretrained_checkpoint
from mmdwnet.ops.export_form import tracing_shapes
from mmdwnet.registry import MODELS
from .dwnet_block import CONV_TYPES, DWBlock, DWStage

__all__ = ['DWNet', 'DWBlock', 'DWStage', 'CONV_TYPES']


@MODELS.register_module()
class DWNet(BaseModule):
    """DWNet backbone.

    A PyTorch implementation of the depth-wise convolution networks of `On the Connection
    between Local Attention and Dynamic Depth-wise Convolution
    <https://arxiv.org/abs/2106.04263>`_ (DW-Conv, D-DW-Conv and I-D-DW-Conv).

    Args:
        arch (str | dict): Network size, ``'tiny'`` (``'t'``) or ``'base'`` (``'b'``), or a
            dict with the keys ``embed_dims`` (int), ``depths`` (list of int, one per
            stage) and ``group_channels`` (list of int, channels per dynamic-kernel group
            in each stage). Defaults to 'tiny'.
        conv_type (str): ``'dw'`` static depth-wise, ``'ddw'`` homogeneous dynamic or
            ``'iddw'`` inhomogeneous dynamic. Defaults to 'dw'.
        in_channels (int): Input image channels. Defaults to 3.
        kernel_size (int): Kernel size K of the depth-wise operators. Defaults to 7. An
            even K (the 12x12 kernels of the paper's 384-pixel fine-tuning, Table 14) keeps
            the map size with K // 2 rows/columns of zero padding before and K // 2 - 1
            after, so tap ``i`` reads offset ``i - K // 2``.
        mlp_ratio (float): FFN hidden width relative to the stage width. Defaults to 4.
        drop_path_rate (float): Stochastic depth rate, growing linearly over the blocks
            from 0 to this value. Defaults to 0.
        out_indices (Sequence[int] | int): Stages whose outputs are returned.
            Defaults to (3, ), the last stage.
        norm_cfg (dict): Norm layers inside the blocks. Defaults to ``dict(type='BN')``.
        predictor_norm_cfg (dict, optional): Norm layer of the dynamic kernel predictors
            (``'ddw'``, ``'iddw'``), if other than ``norm_cfg``. The D-DW predictor
            normalises one pooled vector per image, so a BatchNorm there needs 2+ images
            per device in training; ``dict(type='GN', num_groups=1)`` needs no batch.
            Defaults to None (``norm_cfg``, as in the paper).
        out_norm_cfg (dict, optional): Norm layer applied to each output (``norm{i}``);
            LayerNorm as in the ImageNet models, BN/SyncBN for dense prediction, None for
            no norm. Defaults to ``dict(type='LN')``.
        frozen_stages (int): Stop gradients and set eval mode for the stem (0) and the
            first ``frozen_stages`` stages with their output norms; -1 freezes nothing.
            Defaults to -1.
        norm_eval (bool): Keep every BatchNorm in eval mode during training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing in every block. Defaults to False.
        se_ratio (int, optional): Ablation (Table 15): squeeze-and-excitation after the
            depth-wise operator, squeeze ratio ``se_ratio`` (16 in the ablation config).
            Defaults to None.
        extra_dw (bool): Ablation (Table 6, I-D-DW + DW): an extra residual depth-wise
            convolution before every FFN, as in Shuffle Transformer. Defaults to False.
        shared_kernel_groups (Sequence[int], optional): Ablation (Table 4): per stage, the
            number of kernels shared by groups of channels of the ``'dw'`` operator (e.g.
            Swin-T's heads ``[3, 6, 12, 24]``). Defaults to None (one kernel per channel).
        deploy (bool): Build the inference structure of :meth:`switch_to_deploy` (block
            BatchNorms folded into the convolution/linear layers), e.g. to load a
            checkpoint saved after switching. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config; e.g.
            ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')`` (a local
            checkpoint that does not exist gives a warning and the default init).
            Defaults to truncated-normal Linear weights (std 0.02) and unit LayerNorms.
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {
            'embed_dims': 96,
            'depths': [2, 2, 6, 2],
            'group_channels': [3, 6, 12, 24],
        }),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': 128,
            'depths': [2, 2, 18, 2],
            'group_channels': [4, 8, 16, 32],
        }),
    }
    arch_keys = ('embed_dims', 'depths', 'group_channels')
    default_init_cfg = [
        dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.)
    ]

    def __init__(self,
                 arch: Union[str, Dict] = 'tiny',
                 conv_type: str = 'dw',
                 in_channels: int = 3,
                 kernel_size: int = 7,
                 mlp_ratio: float = 4.,
                 drop_path_rate: float = 0.,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 norm_cfg: Dict = dict(type='BN'),
                 predictor_norm_cfg: Optional[Dict] = None,
                 out_norm_cfg: Optional[Dict] = dict(type='LN'),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 se_ratio: Optional[int] = None,
                 extra_dw: bool = False,
                 shared_kernel_groups: Optional[Sequence[int]] = None,
                 deploy: bool = False,
                 init_cfg: Optional[Union[Dict, Sequence[Dict]]] = default_init_cfg):
        super().__init__(init_cfg=deepcopy(init_cfg))
        if conv_type not in CONV_TYPES:
            raise ValueError(f'DWNet: `conv_type` must be one of {CONV_TYPES}, '
                             f'got {conv_type!r}')
        arch = self._parse_arch(arch, conv_type)
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError('DWNet: `kernel_size` must be a positive int, '
                             f'got {kernel_size!r}')
        self.embed_dims = arch['embed_dims']
        self.depths = list(arch['depths'])
        self.num_stages = len(self.depths)
        self.channels = [self.embed_dims * 2**i for i in range(self.num_stages)]
        self.conv_type = conv_type
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'DWNet: `frozen_stages` must be an int in [-1, '
                             f'{self.num_stages}], got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if se_ratio is not None and (not isinstance(se_ratio, int) or se_ratio < 1):
            raise ValueError(f'DWNet: `se_ratio` must be a positive int or None, '
                             f'got {se_ratio!r}')
        if shared_kernel_groups is not None:
            groups = list(shared_kernel_groups)
            if conv_type != 'dw' or len(groups) != self.num_stages or any(
                    not isinstance(g, int) or g < 1 or c % g
                    for g, c in zip(groups, self.channels)):
                raise ValueError(
                    f"DWNet: `shared_kernel_groups` needs conv_type='dw' and one int per "
                    f'stage dividing its channels {self.channels}, got {shared_kernel_groups!r} '
                    f'with conv_type={conv_type!r}')

        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.embed_dims,
            conv_type='Conv2d',
            kernel_size=4,
            stride=4,
            padding='corner',
            norm_cfg=dict(type='LN'))

        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.stages = ModuleList()
        for i, (depth, channels) in enumerate(zip(self.depths, self.channels)):
            block_cfg = dict(
                conv_type=conv_type,
                kernel_size=kernel_size,
                group_channels=arch['group_channels'][i],
                mlp_ratio=mlp_ratio,
                norm_cfg=norm_cfg,
                predictor_norm_cfg=predictor_norm_cfg,
                with_cp=with_cp,
                se_ratio=se_ratio,
                extra_dw=extra_dw,
                shared_kernel_groups=None if shared_kernel_groups is None else
                shared_kernel_groups[i])
            first = sum(self.depths[:i])
            self.stages.append(
                DWStage(self.channels[i - 1] if i else channels, channels,
                        downsample=i > 0, drop_path_rates=rates[first:first + depth],
                        block_cfg=block_cfg))

        for i in self.out_indices:
            norm = build_norm_layer(out_norm_cfg, self.channels[i])[1] \
                if out_norm_cfg is not None else nn.Identity()
            self.add_module(f'norm{i}', norm)

        self.deploy = False
        if deploy:
            self.switch_to_deploy()
        self._freeze_stages()

    def switch_to_deploy(self) -> None:
        """Fold the BatchNorms of every block into the adjacent layers for inference.

        Each block norm that is a BatchNorm (the default ``norm_cfg``) is merged, with its
        running statistics, into the 1x1 convolution before it, the static or dynamic
        depth-wise kernels before it, or the FFN's first linear layer after it, and then
        removed; outputs in eval mode stay the same (up to float rounding). The stem,
        patch merging and output norms are LayerNorms and stay. Call it after loading the
        weights; MMPretrain's ``tools/model_converters/reparameterize_model.py`` calls it
        and saves a checkpoint that loads into a model built with ``deploy=True``.
        """
        if self.deploy:
            return
        for stage in self.stages:
            for block in stage.blocks:
                block.switch_to_deploy()
        self.deploy = True

    def _parse_arch(self, arch, conv_type: str) -> Dict:
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(f'DWNet: `arch` must be one of {sorted(self.arch_zoo)} or a '
                                 f'dict with keys {self.arch_keys}, got {arch!r}')
            return self.arch_zoo[arch.lower()]
        if not isinstance(arch, dict):
            raise TypeError(f'DWNet: `arch` must be a str or a dict, got '
                            f'{type(arch).__name__} {arch!r}')
        missing = [k for k in self.arch_keys if k not in arch]
        if missing:
            raise ValueError(f'DWNet: the `arch` dict {arch} misses the keys {missing}; '
                             f'it needs all of {self.arch_keys}')
        embed_dims, depths, group_channels = (arch[k] for k in self.arch_keys)
        if not isinstance(embed_dims, int) or embed_dims < 1:
            raise ValueError(f"DWNet: `arch['embed_dims']` must be a positive int, "
                             f'got {embed_dims!r}')
        if (not isinstance(depths, Sequence) or not depths
                or not all(isinstance(d, int) and d >= 1 for d in depths)):
            raise ValueError(f"DWNet: `arch['depths']` must be a non-empty list of positive "
                             f'ints, got {depths!r}')
        if (not isinstance(group_channels, Sequence) or len(group_channels) != len(depths)
                or not all(isinstance(g, int) and g >= 1 for g in group_channels)):
            raise ValueError(f"DWNet: `arch['group_channels']` must be a list of "
                             f'{len(depths)} positive ints (one per stage), '
                             f'got {group_channels!r}')
        for i, g in enumerate(group_channels):
            width = embed_dims * 2**i
            if conv_type == 'iddw' and width % g:
                raise ValueError(
                    f"DWNet: stage {i} has {width} channels, which `arch['group_channels']"
                    f"[{i}]` = {g} must divide; choose embed_dims and group_channels so "
                    'that every stage splits into whole groups')
            if conv_type != 'dw' and width % 4:
                raise ValueError(
                    f'DWNet: stage {i} has {width} channels, but the kernel predictor of '
                    f"conv_type={conv_type!r} reduces them by 4, so 4 must divide them; "
                    "choose arch['embed_dims'] accordingly")
        return arch

    def _parse_out_indices(self, out_indices) -> tuple:
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        if not isinstance(out_indices, Sequence) or not all(
                isinstance(i, int) for i in out_indices):
            raise TypeError(f'DWNet: `out_indices` must be an int or a sequence of ints, '
                            f'got {out_indices!r}')
        parsed = []
        for i in out_indices:
            if not -self.num_stages <= i < self.num_stages:
                raise ValueError(f'DWNet: `out_indices` {tuple(out_indices)} contains {i}; '
                                 f'allowed stage indices are 0..{self.num_stages - 1} '
                                 f'(or negative from the end)')
            parsed.append(i % self.num_stages)
        return tuple(parsed)

    def forward(self, x: Tensor) -> tuple:
        if not isinstance(x, Tensor):
            raise TypeError(f'DWNet: input must be a torch.Tensor, got {type(x).__name__}')
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'DWNet: input must have shape (B, {self.in_channels}, H, W), '
                             f'got {tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'DWNet: input must be a floating-point tensor, got dtype '
                            f'{x.dtype}; normalise the images first, e.g. '
                            '(x.float() - mean) / std (the data preprocessors of the configs '
                            'do this)')
        b = x.shape[0]
        if b == 0 and not tracing_shapes():  # no images: empty maps of the output sizes
            return self._empty_outputs(x)
        if tracing_shapes():
            x = self._embed_for_export(x)
        else:
            x, (h, w) = self.patch_embed(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self._apply_norm(getattr(self, f'norm{i}'), x))
        return tuple(outs)

    def _empty_outputs(self, x: Tensor) -> tuple:
        h, w = (x.shape[2] + 3) // 4, (x.shape[3] + 3) // 4  # the stem pads to 4*ceil
        outs = []
        for i, channels in enumerate(self.channels):
            if i > 0:
                h, w = (h + 1) // 2, (w + 1) // 2  # patch merging pads to 2*ceil
            if i in self.out_indices:
                outs.append(x.new_zeros(0, channels, h, w))
        return tuple(outs)

    def _embed_for_export(self, x: Tensor) -> Tensor:
        """The stem with its 'corner' padding written into the graph: mmcv's adaptive
        padding decides in Python whether to pad, which an exporter would fix for the
        example's size (:func:`mmdwnet.ops.export_mode`). The padded size is written as
        ``stride * ceil(size / stride)`` so that symbolic shapes stay provably divisible
        (``torch.export`` adds no guards)."""
        (sh, sw), (h, w) = self.patch_embed.projection.stride, x.shape[2:]
        x = F.pad(x, (0, sw * ((w + sw - 1) // sw) - w, 0, sh * ((h + sh - 1) // sh) - h))
        x = self.patch_embed.projection(x)
        if self.patch_embed.norm is not None:
            x = self._apply_norm(self.patch_embed.norm, x)
        return x

    @staticmethod
    def _apply_norm(norm: nn.Module, x: Tensor) -> Tensor:
        if isinstance(norm, nn.LayerNorm):  # normalises the last dim: channels-last
            return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return norm(x)

    def init_weights(self):
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'):
            return super().init_weights()
        if missing_pretrained_checkpoint(cfg, 'DWNet'):
            self.init_cfg = deepcopy(self.default_init_cfg)
            return super().init_weights()
        # default initialisation first: what the checkpoint does not provide starts fresh
        self.init_cfg = deepcopy(self.default_init_cfg)
        super().init_weights()
        self.init_cfg = cfg
        load_pretrained_backbone(self, cfg['checkpoint'], cfg.get('prefix'),
                                 cfg.get('map_location', 'cpu'), owner='DWNet')

    def get_layer_depth(self, param_name: str, prefix: str = ''):
        """Layer-wise depth of a parameter, for layer-wise learning-rate decay.

        Args:
            param_name (str): The name of the parameter.
            prefix (str): The prefix of the backbone's parameters. Defaults to ''.

        Returns:
            tuple[int, int]: The depth of the parameter and the number of depths: 0 for the
            stem, one per block (a stage's patch merging goes with its first block), and
            the last one for the output norms and everything outside the backbone.
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        names = param_name[len(prefix):].split('.')
        if names[0] == 'patch_embed':
            return 0, num_layers
        if names[0] == 'stages':
            stage_id = int(names[1])
            block_id = int(names[3]) if names[2] == 'blocks' else 0
            return sum(self.depths[:stage_id]) + block_id + 1, num_layers
        return num_layers - 1, num_layers

    def _freeze_stages(self):
        frozen = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for m in frozen:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
