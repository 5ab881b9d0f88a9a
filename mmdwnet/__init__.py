from . import models  # noqa: F401  (registers the models)
from .compat import apply as _apply_compatibility_patches
from .version import __version__

_apply_compatibility_patches()  # every change to other libraries: mmdwnet/compat.py

__all__ = ['__version__']
