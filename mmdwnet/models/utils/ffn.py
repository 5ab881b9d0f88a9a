"""The FFN of DWNet's blocks."""
import torch
from mmcv.cnn.bricks.transformer import FFN
from torch import Tensor, nn

from mmdwnet.ops import gelu_mlp
from .drop_path import residual_drop_path
from .fuse_bn import fold_bn_before_linear
from .fused_layers import LinearAdd, LinearGELU, add_branch


class DWFFN(FFN):
    """mmcv's :class:`~mmcv.cnn.bricks.transformer.FFN` with two layers (same arguments,
    parameters and state-dict keys), called with the identity it adds:
    ``identity + drop_path(fc2(act(fc1(x))))``.

    With the exact GELU and no dropout, autograd records ``fc2(GELU(fc1(x)))`` as
    :func:`mmdwnet.ops.gelu_mlp`, whose CPU form trains faster. :meth:`switch_to_deploy`
    turns the first layer and its GELU into one :class:`LinearGELU` and the second layer
    and the residual addition into one :class:`LinearAdd`, for inference.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, num_fcs=2, add_identity=True, **kwargs)

    @property
    def exact_gelu_mlp(self) -> bool:
        """Whether the layers compute ``fc2(GELU(fc1(x)))``: the exact GELU, dropouts
        that drop nothing."""
        (_, act, drop1), _, drop2 = self.layers
        return (type(act) is nn.GELU and act.approximate == 'none'
                and all(drop.p == 0 or not drop.training for drop in (drop1, drop2)))

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        (fc1, _, _), fc2, _ = self.layers
        if self.exact_gelu_mlp and torch.is_grad_enabled():
            y = gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            return residual_drop_path(identity, self.gamma2(y), self.dropout_layer)
        return add_branch(identity, fc2, self.layers[0](x), self.gamma2, self.dropout_layer)

    def switch_to_deploy(self, norm_owner: nn.Module, norm: str) -> None:
        """Fold the norm ``norm_owner.<norm>`` in front of the FFN into the first layer,
        then fuse the layers with their activation and the residual addition."""
        fold_bn_before_linear(norm_owner, norm, self.layers[0][0])
        hidden = self.layers[0]
        if (isinstance(hidden[0], nn.Linear) and not isinstance(hidden[0], LinearGELU)
                and type(hidden[1]) is nn.GELU and hidden[1].approximate == 'none'):
            hidden[0] = LinearGELU.from_linear(hidden[0])
            hidden[1] = nn.Identity()
        # the second layer and the residual addition (with no layer scale between them)
        fc2 = self.layers[1]
        if (isinstance(fc2, nn.Linear) and not isinstance(fc2, LinearAdd)
                and isinstance(self.gamma2, nn.Identity)):
            self.layers[1] = LinearAdd.from_linear(self.layers[1])
