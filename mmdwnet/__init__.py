from . import models  # noqa: F401  (registers the models)
from .apis.model_hub import register_models
from .utils import amp_hint
from .utils.checkpoint import register_atomic_local_backend, register_checkpoint_types
from .version import __version__

register_checkpoint_types()
register_atomic_local_backend()
amp_hint.install()
register_models()  # mmpretrain.list_models / get_model / inference_model by config name

__all__ = ['__version__']
