from .dwnet import DWNet
from .local_mlp import LocalMLP

__all__ = ['DWNet', 'LocalMLP']
