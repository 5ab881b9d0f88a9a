"""Checkpoints: atomic writes and finding a readable one (mmdwnet/utils/checkpoint.py)."""


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """mmengine's local writes (Runner checkpoints) go through a temporary file and a rename:
    a save killed part way leaves the previous file whole and no partial file; the file is
    what mmengine writes, loadable by torch.load; a damaged file is told from a whole one."""
    import os

    import pytest
    import torch
    from mmengine.fileio import get_file_backend
    from mmengine.runner.checkpoint import save_checkpoint

    from mmdwnet.utils.checkpoint import (AtomicLocalBackend, is_readable_checkpoint,
                                          newest_readable_checkpoint)
    path = tmp_path / 'epoch_1.pth'
    assert isinstance(get_file_backend(str(path)), AtomicLocalBackend)
    save_checkpoint({'meta': {'epoch': 1}, 'state_dict': {'w': torch.ones(3)}}, str(path))
    assert torch.load(path, weights_only=True)['meta'] == {'epoch': 1}
    before = path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # as a kill after writing, before the rename

    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'meta': {'epoch': 2}, 'state_dict': {'w': torch.zeros(3)}}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['epoch_1.pth']
    assert is_readable_checkpoint(str(path))
    (tmp_path / 'epoch_2.pth').write_bytes(before[:len(before) // 2])
    damaged = bytearray(before)
    damaged[before.index(torch.ones(3).numpy().tobytes())] ^= 0xFF  # a weight's byte
    (tmp_path / 'epoch_3.pth').write_bytes(bytes(damaged))
    assert not is_readable_checkpoint(str(tmp_path / 'epoch_2.pth'))
    assert not is_readable_checkpoint(str(tmp_path / 'epoch_3.pth'))
    assert newest_readable_checkpoint(str(tmp_path)) == str(path)
