"""Every change mmdwnet makes to other libraries, in one place: what it changes, why (the
upstream issue), and when it can be removed.

``import mmdwnet`` (every config's ``custom_imports``) applies :data:`PATCHES` once, through
:func:`apply`; each patch can be applied again without effect. One change must be in place
before any config is read, earlier than ``import mmdwnet`` can run: the resolution of
``mmdwnet::`` config paths, which the top-level module ``_mmdwnet_mim`` applies at
interpreter start (``mmdwnet-mim.pth``). It is listed here too, with ``apply=None``.
"""
import functools
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Patch:
    """One change to another library.

    Args:
        name (str): Short name.
        changes (str): What is changed, by its import path.
        why (str): Why, with the upstream issue where there is one.
        remove_when (str): The condition under which the patch can go.
        apply (callable, optional): Applies it (again: no effect); None where it is
            applied outside :func:`apply`.
    """
    name: str
    changes: str
    why: str
    remove_when: str
    apply: Optional[Callable[[], None]]


def _history_buffer_state(self) -> dict:
    # The statistics methods are registered on the class by code; HistoryBuffer's own
    # __setstate__ restores the defaults when they are missing from the state.
    state = self.__dict__.copy()
    state.pop('statistics_methods', None)
    return state


def weights_only_checkpoints() -> None:
    """Allow the types of mmengine Runner checkpoints for ``weights_only`` loading, route
    mmengine's local checkpoint loading through
    :func:`mmdwnet.utils.checkpoint.load_from_local`, and stop ``HistoryBuffer`` pickling
    its statistics functions (unpickling them needs ``builtins.getattr``)."""
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner import CheckpointLoader

    from mmdwnet.utils.checkpoint import checkpoint_safe_globals, load_from_local
    HistoryBuffer.__getstate__ = _history_buffer_state
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def atomic_local_writes() -> None:
    """Make :class:`mmdwnet.utils.checkpoint.AtomicLocalBackend` mmengine's backend for
    local paths (and drop any cached instance of the plain one)."""
    from mmengine.fileio import LocalBackend
    from mmengine.fileio import io as mmengine_io
    from mmengine.fileio import register_backend

    from mmdwnet.utils.checkpoint import AtomicLocalBackend
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    for key, backend in list(mmengine_io.backend_instances.items()):
        if type(backend) is LocalBackend:
            del mmengine_io.backend_instances[key]


AMP_HINT = ('mmdwnet: this machine has no CUDA, and the config trains with mixed precision '
            '(AmpOptimWrapper). Train in float32 with the stock tools by adding '
            '`--cfg-options optim_wrapper.type=OptimWrapper`, or use mmdwnet\'s '
            'tools/train.py, which does so by itself.')


def amp_hint() -> None:
    """Add :data:`AMP_HINT` to the message of mmengine's no-GPU assertion in
    ``AmpOptimWrapper.__init__``; nothing else about it changes."""
    from mmengine.optim import AmpOptimWrapper
    init = AmpOptimWrapper.__init__
    if getattr(init, '_mmdwnet_hint', False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except AssertionError as e:
            if 'only available training' not in str(e):
                raise
            raise AssertionError(f'{e}\n{AMP_HINT}') from None

    __init__._mmdwnet_hint = True
    AmpOptimWrapper.__init__ = __init__


def model_hub() -> None:
    """Register mmdwnet's ImageNet model index with mmpretrain's ``ModelHub``."""
    from mmdwnet.apis.model_hub import register_models
    register_models()


PATCHES = (
    Patch('weights-only checkpoints',
          changes='mmengine.runner.CheckpointLoader (local paths), '
          'torch.serialization safe globals, '
          'mmengine.logging.history_buffer.HistoryBuffer.__getstate__',
          why='torch >= 2.6 loads with weights_only=True, and mmengine 0.10.7 Runner '
          'checkpoints hold HistoryBuffer log buffers with numpy arrays: stock --resume and '
          'testing fail (open-mmlab/mmengine#1655; the upstream fix proposed in '
          'open-mmlab/mmengine#1650 turns weights_only off instead)',
          remove_when='mmengine loads its Runner checkpoints with weights_only=True by itself',
          apply=weights_only_checkpoints),
    Patch('atomic checkpoint writes',
          changes="mmengine.fileio backend for local paths ('local')",
          why='mmengine writes checkpoints in place: a job killed while saving leaves a '
          'truncated file, which last_checkpoint then names and --resume cannot read',
          remove_when="mmengine's LocalBackend writes through a temporary file and a rename",
          apply=atomic_local_writes),
    Patch('AMP hint without CUDA',
          changes='mmengine.optim.AmpOptimWrapper.__init__ (the message of its no-GPU '
          'assertion only)',
          why="the dense configs train with AmpOptimWrapper; the stock tools on a CPU stop "
          "with mmengine's bare assertion, which does not say how to go on",
          remove_when='the stock tools fall back to float32 without CUDA, or mmengine names '
          'the override itself',
          apply=amp_hint),
    Patch('model hub',
          changes='mmpretrain.apis.ModelHub (registers configs/mmpretrain/model-index.yml)',
          why='mmpretrain.list_models / get_model / inference_model find models only in the '
          'registered indexes',
          remove_when='never: it is mmpretrain\'s registration API, not a change of behaviour',
          apply=model_hub),
    Patch('mmdwnet:: config paths',
          changes='mmengine.config.utils.MODULE2PACKAGE, '
          'mmengine.utils.package_utils.get_installed_path, '
          'mim.utils.utils.get_installed_path (in _mmdwnet_mim, at interpreter start)',
          why='mmengine 0.10.x resolves PKG:: only for the packages in its hard-coded '
          'MODULE2PACKAGE and locates them through their distribution, which for an '
          'editable install is not where the code is',
          remove_when='mmengine resolves PKG:: for any installed package from where it is '
          'imported',
          apply=None),
)


def apply() -> None:
    """Apply every patch of :data:`PATCHES` that is applied on ``import mmdwnet``."""
    for patch in PATCHES:
        if patch.apply is not None:
            patch.apply()
