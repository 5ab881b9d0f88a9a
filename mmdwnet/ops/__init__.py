from .inhomogeneous_dwconv import InhomogeneousDWConv2d, inhomogeneous_dwconv2d

__all__ = ['inhomogeneous_dwconv2d', 'InhomogeneousDWConv2d']
