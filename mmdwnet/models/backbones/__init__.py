from .dwnet import DWNet

__all__ = ['DWNet']
