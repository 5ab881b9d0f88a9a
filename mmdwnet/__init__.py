from . import models  # noqa: F401  (registers the models)
from .version import __version__

__all__ = ['__version__']
