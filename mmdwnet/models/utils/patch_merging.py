import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import PatchMerging
from torch import Tensor, nn

from mmdwnet.ops.export_form import tracing_shapes
from .fused_layers import linear


class ChannelsLastPatchMerging(PatchMerging):
    """mmcv's 2x2 :class:`PatchMerging` on channels-last maps, without ``nn.Unfold``.

    The same parameters, state-dict keys and outputs as mmcv's module with
    ``kernel_size=2`` (stride 2, ``'corner'`` padding of odd sizes): each 2x2
    neighbourhood is gathered by one reshape and permute of the (B, H, W, C) map, then
    LayerNorm and the bias-free reduction. The parameters are in ``nn.Unfold``'s channel
    order ``4 * c + 2 * row + col``; the features are gathered in the order
    ``(2 * row + col) * C + c``, a faster copy, and the parameters are reordered to match
    (so the norm must be a LayerNorm, whose statistics do not depend on the order).

    Why not mmcv's forward: ``nn.Unfold`` works on (B, C, H, W) and its backward
    (``col2im``) returns a contiguous (B, C, H, W) gradient. In DWNet that gradient
    meets the channels-last gradients of the residual branches, and every BatchNorm
    backward of the stage before then runs PyTorch's mixed-layout path, about 5x slower
    than the channels-last one. Gathering the patches by a permute keeps the gradient
    channels-last, and is cheaper than ``im2col``/``col2im`` besides.

    Args:
        in_channels (int): Channels of the input map.
        out_channels (int): Channels of the merged map.
        norm_cfg (dict, optional): Norm over the 4 * ``in_channels`` gathered
            features: a LayerNorm, or None for none. Defaults to ``dict(type='LN')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg=dict(type='LN'),
                 init_cfg=None):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2,
                         padding='corner', norm_cfg=norm_cfg, init_cfg=init_cfg)
        if self.norm is not None and not isinstance(self.norm, nn.LayerNorm):
            raise ValueError(f'ChannelsLastPatchMerging: `norm_cfg` must build a LayerNorm '
                             f'(or be None), got {norm_cfg!r}')

    def forward(self, x: Tensor, input_size) -> tuple:
        """Merge a (B, H*W, C) sequence of an H x W map into (B, ceil(H/2)*ceil(W/2),
        out_channels); returns it with its spatial size, as mmcv's module does."""
        b, length, c = x.shape
        h, w = input_size
        if not tracing_shapes() and length != h * w:
            raise ValueError(f'ChannelsLastPatchMerging: input of length {length} does '
                             f'not match input_size {tuple(input_size)}')
        x = x.view(b, h, w, c)
        # 'corner' padding: zeros at the bottom and on the right (always written out while
        # exporting, so that the graph pads whatever size it is given)
        # (the padded size as 2 * ceil(size / 2), so that symbolic shapes stay provably
        # even and torch.export adds no guards)
        out_h, out_w = (h + 1) // 2, (w + 1) // 2
        if tracing_shapes() or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, 2 * out_w - w, 0, 2 * out_h - h))
        x = x.view(b, out_h, 2, out_w, 2, c)
        # Gathered in (row, col, channel) order, a copy of runs of 2 * c values (nn.Unfold's
        # order, channel-major, is a copy of single values c apart: about 10x slower at
        # DWNet-T's first merging); the parameters follow the features instead. A
        # LayerNorm's statistics do not depend on the order of the features.
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, out_h * out_w, 4 * c)
        if self.norm is not None:
            weight, bias = self.norm.weight, self.norm.bias
            x = F.layer_norm(x, self.norm.normalized_shape,
                             None if weight is None else _gathered_order(weight),
                             None if bias is None else _gathered_order(bias), self.norm.eps)
        # oneDNN's linear layer in inference on CPU (fused_layers.linear): in float32
        # PyTorch's addmm runs MKL, slower at these shapes on the AMD EPYC hosts
        # (DWNet-T's three mergings at batch 16: 61.4 -> 44.2 ms; in bfloat16 both take
        # about 16.5 ms)
        return linear(x, _gathered_order(self.reduction.weight),
                      self.reduction.bias), (out_h, out_w)


def _gathered_order(param: Tensor) -> Tensor:
    """``param``'s last dimension from nn.Unfold's order ``4 * c + 2 * row + col`` to the
    gathered order ``(2 * row + col) * C + c``: a transpose of (C, 4) (a strided copy,
    about 4x faster than indexing at DWNet-T's last merging)."""
    return param.unflatten(-1, (-1, 4)).transpose(-1, -2).flatten(-2)
