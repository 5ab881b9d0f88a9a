"""Runner checkpoints with torch's safe ``weights_only`` loading.

Since torch 2.6 ``torch.load`` only unpickles tensors, containers and explicitly allowed
types. mmengine 0.10.7 checkpoints also hold its ``HistoryBuffer`` log buffers (numpy
arrays and scalars inside) in ``message_hub``, so ``--resume`` and loading a trained model
fail. :func:`load_from_local`, which ``import mmdwnet`` makes mmengine's loader for local
paths (:mod:`mmdwnet.compat`), allows exactly those types (:func:`checkpoint_safe_globals`)
and keeps ``weights_only=True``; unreadable files raise :class:`CheckpointError` naming the
file.

Local files written through mmengine's file backends (Runner checkpoints among them) are
written atomically (:class:`AtomicLocalBackend`, mmengine's local backend once mmdwnet is
imported), and :func:`newest_readable_checkpoint`
finds where a resume can start when the newest checkpoint was cut short anyway.
"""
import glob
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from typing import Iterable, Optional, Union

import numpy as np
import torch
from mmengine.fileio import LocalBackend
from mmengine.logging.history_buffer import HistoryBuffer


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded (corrupt, truncated, or unsafe content)."""


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


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing atomically: into a temporary file in the same
    directory, flushed and fsynced, then renamed over the target. A process killed while
    saving (preemption, OOM kill, full disk) leaves the previous file or the new one,
    never a partial one; and the Runner's ``last_checkpoint``, written after the save
    returns, only ever names complete files. The bytes are those mmengine writes."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        self._write_atomically(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike],
                 encoding: str = 'utf-8') -> None:
        self._write_atomically(obj.encode(encoding), filepath)

    @staticmethod
    def _write_atomically(data: bytes, filepath) -> None:
        filepath = str(filepath)
        directory = osp.dirname(osp.abspath(filepath))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{osp.basename(filepath)}.',
                                   suffix='.tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        except BaseException:
            if osp.exists(tmp):
                os.remove(tmp)
            raise


def is_readable_checkpoint(filename: str) -> bool:
    """Whether ``filename`` is a complete ``torch.save`` archive: its zip directory reads
    and every member's CRC matches (a truncated or damaged file fails; no unpickling)."""
    try:
        with zipfile.ZipFile(filename) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def newest_readable_checkpoint(work_dir: str, exclude: Iterable[str] = ()) -> Optional[str]:
    """The most recently written ``*.pth`` in ``work_dir`` that
    :func:`is_readable_checkpoint` accepts, other than ``exclude``; None if there is none."""
    excluded = {osp.abspath(p) for p in exclude}
    candidates = [p for p in glob.glob(osp.join(work_dir, '*.pth'))
                  if osp.abspath(p) not in excluded]
    for path in sorted(candidates, key=osp.getmtime, reverse=True):
        if is_readable_checkpoint(path):
            return path
    return None
