"""Local MLP: the static version of Swin Transformer (paper Tables 2, 4, 5 and appendix E).

Swin's window attention with the query and key projections, the dot product and the softmax
removed: each head mixes the values of a window with connection weights that are model
parameters, learned and shared by all images (and, as Swin's heads, by the channels of a
head). Swin's shifted windows, blocks, patch merging and FFNs are reused from MMPretrain.
"""
import math
from typing import Optional, Sequence

import torch
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmpretrain.models.backbones import SwinTransformer
from torch import Tensor, nn

from mmdwnet.models.utils import missing_pretrained_checkpoint
from mmdwnet.registry import MODELS


class WindowLocalMLP(BaseModule):
    """Static window mixing in place of MMPretrain's ``WindowMSA`` (same call signature).

    ``out = proj(W_h @ v)`` per head ``h``, with ``v`` a linear projection of the window's
    tokens and ``W`` a learned (heads, N, N) matrix per window position (or one for all
    windows). In shifted windows, the pairs Swin masks out (tokens from different image
    regions) get zero weight.

    Args:
        embed_dims (int): Channels C.
        window_size (tuple[int, int]): Window height and width.
        num_heads (int): Heads; each has its own mixing matrix.
        num_windows (int): Windows with their own weights (the windows of the training
            resolution), or 1 to share the weights across windows. Defaults to 1.
        qkv_bias (bool): Bias of the value projection (Swin's ``qkv_bias``). Defaults to True.
        attn_drop (float): Dropout on the mixing weights. Defaults to 0.
        proj_drop (float): Dropout after the output projection. Defaults to 0.
        init_cfg (dict, optional): Initialization config. Defaults to None.
        **kwargs: Ignored attention-only arguments of ``WindowMSA`` (e.g. ``qk_scale``).
    """

    def __init__(self,
                 embed_dims: int,
                 window_size: Sequence[int],
                 num_heads: int,
                 num_windows: int = 1,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None,
                 **kwargs):
        super().__init__(init_cfg)
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.window_size = tuple(window_size)
        n = self.window_size[0] * self.window_size[1]
        self.num_windows = num_windows
        self.mixing = nn.Parameter(torch.zeros(num_windows, num_heads, n, n))
        self.v = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self):
        super().init_weights()
        # the paper does not say; like Swin's relative-position table: N(0, 0.02)
        trunc_normal_(self.mixing, std=.02)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B * nW, N, C) windows of B images; mask: (nW, N, N), 0 where allowed."""
        windows, n, c = x.shape
        nw = mask.shape[0] if mask is not None else self.num_windows
        if self.num_windows not in (1, nw) or windows % nw:
            raise ValueError(
                f'WindowLocalMLP: {self.num_windows} window weight sets for {windows} windows '
                f'of {nw} per image; per-window weights need the training resolution (build '
                'the backbone with share_windows=True for other input sizes)')
        v = self.v(x).view(windows // nw, nw, n, self.num_heads, c // self.num_heads)
        weight = self.mixing.expand(nw, -1, -1, -1) if self.num_windows == 1 else self.mixing
        if mask is not None:
            weight = weight * (mask == 0).unsqueeze(1).to(weight.dtype)
        weight = self.attn_drop(weight)
        out = torch.einsum('whij,bwjhd->bwihd', weight, v).reshape(windows, n, c)
        return self.proj_drop(self.proj(out))


@MODELS.register_module()
class LocalMLP(SwinTransformer):
    """Local MLP backbone: MMPretrain's ``SwinTransformer`` whose window attention is
    :class:`WindowLocalMLP`.

    Args:
        arch (str | dict): Swin's ``arch`` (``'tiny'``, ``'base'``...). Defaults to 'tiny'.
        img_size (int): Training resolution; with per-window weights it fixes the number
            of windows of each stage. Defaults to 224.
        share_windows (bool): One set of mixing weights for all windows (Table 4, sharing
            across positions; needed for inputs of other sizes, e.g. detection). Defaults
            to False: per-window weights as in Table 2 (26M for the tiny model).
        window_size (int): Window size. Defaults to 7.
        **kwargs: Other arguments of ``SwinTransformer`` (``drop_path_rate``,
            ``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``, ``init_cfg``...).
    """

    def __init__(self,
                 arch='tiny',
                 img_size: int = 224,
                 share_windows: bool = False,
                 window_size: int = 7,
                 **kwargs):
        if 'stage_cfgs' in kwargs:
            raise ValueError('LocalMLP sets `stage_cfgs` itself (the window module)')
        depths = (arch['depths'] if isinstance(arch, dict) else
                  SwinTransformer.arch_zoo[arch.lower()]['depths'])
        stage_cfgs = []
        for i in range(len(depths)):
            side = math.ceil(img_size / 4 / 2**i / window_size)
            stage_cfgs.append(dict(block_cfgs=dict(attn_cfgs=dict(
                window_msa=WindowLocalMLP,
                num_windows=1 if share_windows else side * side))))
        self.share_windows = share_windows
        super().__init__(arch=arch, img_size=img_size, window_size=window_size,
                         stage_cfgs=stage_cfgs, **kwargs)

    def init_weights(self):
        if missing_pretrained_checkpoint(self.init_cfg, 'LocalMLP'):
            self.init_cfg = None  # Swin's own initialisation
        super().init_weights()
