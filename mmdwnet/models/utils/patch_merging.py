import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import PatchMerging
from torch import Tensor

from mmdwnet.ops.export_form import tracing_shapes


class ChannelsLastPatchMerging(PatchMerging):
    """mmcv's 2x2 :class:`PatchMerging` on channels-last maps, without ``nn.Unfold``.

    The same parameters, state-dict keys and outputs as mmcv's module with
    ``kernel_size=2`` (stride 2, ``'corner'`` padding of odd sizes): each 2x2
    neighbourhood is gathered in ``nn.Unfold``'s channel order ``4 * c + 2 * row + col``
    by one reshape and permute of the (B, H, W, C) map, then LayerNorm and the
    bias-free reduction.

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
            features. Defaults to ``dict(type='LN')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg=dict(type='LN'),
                 init_cfg=None):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2,
                         padding='corner', norm_cfg=norm_cfg, init_cfg=init_cfg)

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
        x = x.view(b, out_h, 2, out_w, 2, c).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, out_h * out_w, 4 * c)
        x = self.norm(x) if self.norm else x
        return self.reduction(x), (out_h, out_w)
