"""Runner checkpoints with torch's safe ``weights_only`` loading.

Since torch 2.6 ``torch.load`` only unpickles tensors, containers and explicitly allowed
types. mmengine 0.10.7 checkpoints also hold its ``HistoryBuffer`` log buffers (numpy
arrays and scalars inside) in ``message_hub``, so ``--resume`` and loading a trained model
fail. :func:`register_checkpoint_types` (run by ``import mmdwnet``) allows exactly those types
and keeps ``weights_only=True``; it also makes HistoryBuffer stop pickling its statistics
functions, which would need ``builtins.getattr`` - a door to arbitrary code that no
allow-list should open. Unreadable files raise :class:`CheckpointError` naming the file.
"""
import os.path as osp
import pickle
import zipfile

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import CheckpointLoader


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded (corrupt, truncated, or unsafe content)."""


def _history_buffer_state(self) -> dict:
    # The statistics methods are registered on the class by code; HistoryBuffer's own
    # __setstate__ restores the defaults when they are missing from the state.
    state = self.__dict__.copy()
    state.pop('statistics_methods', None)
    return state


def checkpoint_safe_globals() -> list:
    """The non-tensor types in mmengine Runner checkpoints."""
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        np.array(0).__reduce__()[0],  # numpy's array reconstructor (numpy 1.x and 2.x path)
        np.float64(0).__reduce__()[0],  # numpy's scalar constructor
        *{type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')},
    ]


def load_from_local(filename: str, map_location=None):
    """mmengine's loader for local paths, with ``weights_only=True`` and clear errors."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} does not exist')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split('WeightsUnpickler error: ')[-1].split('\n')[0]
        raise CheckpointError(
            f'checkpoint {filename} holds objects that a weights_only load does not allow '
            f'({detail}); mmdwnet allows what mmengine Runner checkpoints need. Only if '
            'you trust the file, convert it with torch.load(..., weights_only=False).') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        detail = str(e).strip().split('\n')[0]
        raise CheckpointError(f'checkpoint {filename} is corrupt or truncated and cannot be '
                              f'read ({type(e).__name__}: {detail})') from e


def register_checkpoint_types() -> None:
    """Allow the types of Runner checkpoints for ``weights_only`` loading and route
    mmengine's local checkpoint loading through :func:`load_from_local`."""
    HistoryBuffer.__getstate__ = _history_buffer_state
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
