from .config import use_backend
from .depthwise_conv import DepthwiseConv2d, depthwise_conv2d
from .dispatch import explain, fallbacks
from .export_form import export_mode, in_export_mode
from .gelu_mlp import gelu_mlp
from .inhomogeneous_dwconv import inhomogeneous_dwconv2d
from .predicted_idwconv import predicted_idwconv2d

__all__ = [
    'inhomogeneous_dwconv2d', 'predicted_idwconv2d', 'depthwise_conv2d', 'DepthwiseConv2d',
    'export_mode', 'in_export_mode', 'gelu_mlp', 'use_backend', 'explain', 'fallbacks'
]
