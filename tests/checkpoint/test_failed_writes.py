"""A full disk or a read-only folder while writing a checkpoint or appending metrics: nothing on
disk is damaged, the temporary file is removed, and the error names the folder and the space.

The disk fills up part way through the write: the file object the checkpoint is written to
(the one ``atomic_write`` opens) accepts some bytes, then raises ``ENOSPC`` as the kernel does.
A read-only folder is made with chmod; as root, where chmod does not stop writes, opening a file
in it is made to fail with ``EACCES`` as it would for any other user.
"""

import errno
import os
import shutil

import pytest
import torch
from torch import nn

from dino_d2.checkpoint import AtomicCheckpointer
from dino_d2.utils import OutputWriteError, atomic
from dino_d2.checkpoint.checkpointer import _serialized_size


class _FillsUp:
    """A real file that accepts ``budget`` bytes, then fails with ENOSPC."""

    def __init__(self, file, budget):
        self._file = file
        self._budget = budget
        self.written = 0

    def write(self, data):
        data = bytes(data)
        room = self._budget - self.written
        if len(data) > room:
            self._file.write(data[: max(room, 0)])
            self._file.flush()
            self.written = self._budget
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


class _Disk:
    """Once ``fill_up()`` is called, each file atomic_write opens accepts 4 KiB, then raises
    ENOSPC; ``partial`` lists the temporary files in ``folder`` and the bytes the one written
    held when it did."""

    budget = 4096

    def __init__(self, monkeypatch, folder):
        self.folder = folder
        self.partial = []
        self._real_fdopen = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", self._fdopen)
        self._full = False

    def fill_up(self):
        self._full = True

    def _fdopen(self, fd, *args, **kwargs):
        file = self._real_fdopen(fd, *args, **kwargs)
        if not self._full:
            return file
        disk = self

        class Recorded(_FillsUp):
            def write(self, data):
                try:
                    return super().write(data)
                except OSError:
                    temporary = [n for n in os.listdir(disk.folder) if n.endswith(".tmp")]
                    disk.partial.append((temporary, os.fstat(file.fileno()).st_size))
                    raise

        return Recorded(file, self.budget)


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _checkpointer(folder):
    model = nn.Linear(64, 64)
    return model, AtomicCheckpointer(model, str(folder))


def test_disk_full_part_way_keeps_the_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    disk = _Disk(monkeypatch, tmp_path)
    model, checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_final", iteration=1)
    before = _files(tmp_path)
    with torch.no_grad():
        model.weight.add_(1.0)
    disk.fill_up()
    needed = _serialized_size({"model": model.state_dict(), "iteration": 3})
    for name in ("model_0000003", "model_final"):
        with pytest.raises(OutputWriteError) as error:
            checkpointer.save(name, iteration=3)
        # The temporary file was really written part way before the disk filled up.
        (temporary,), size = disk.partial[-1]
        assert temporary.startswith(f".{name}.pth.") and size == disk.budget
        message = str(error.value)
        assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
        assert message.startswith(f"Could not write {name}.pth in {tmp_path}: ")
        assert "No space left on device (the disk is full)" in message
        assert error.value.needed_bytes == needed > disk.budget
        free = error.value.free_bytes
        assert abs(free - shutil.disk_usage(tmp_path).free) < 2**20
        assert f"Writing it needs {atomic.format_size(needed)}" in message
        assert f"has {atomic.format_size(free)} free" in message
        assert "last_checkpoint still names model_final.pth, which is complete" in message
        assert "--resume" in message
    # Nothing changed on disk: same files, same bytes, no temporary file left.
    assert _files(tmp_path) == before
    loaded = AtomicCheckpointer(nn.Linear(64, 64), str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 1


def test_read_only_folder_keeps_everything_and_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    model, checkpointer = _checkpointer(folder)
    checkpointer.save("model_0000001", iteration=1)
    before = _files(folder)
    os.chmod(folder, 0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
            writable = True
            probe.unlink()
        except PermissionError:
            writable = False
        if writable:  # root: the kernel would refuse any other user
            real_open = os.open

            def refuse_in_folder(path, flags, *args):
                if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & os.O_CREAT:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                return real_open(path, flags, *args)

            monkeypatch.setattr(atomic.os, "open", refuse_in_folder)
        with pytest.raises(OutputWriteError) as error:
            checkpointer.save("model_0000003", iteration=3)
    finally:
        os.chmod(folder, 0o755)
    message = str(error.value)
    assert error.value.errno == errno.EACCES
    assert message.startswith(f"Could not write model_0000003.pth in {folder}: Permission denied")
    assert "(this user may not write in that folder)" in message
    assert "last_checkpoint still names model_0000001.pth" in message
    assert _files(folder) == before


def test_failed_pointer_update_keeps_the_old_pointer(tmp_path, monkeypatch):
    _, checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    real_write = atomic.atomic_write

    def pointer_fails(path, write, mode="wb"):
        if os.path.basename(path) == "last_checkpoint":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, write, mode=mode)

    monkeypatch.setattr("dino_d2.checkpoint.checkpointer.atomic_write", pointer_fails)
    with pytest.raises(
        OutputWriteError,
        match="model_0000002.pth is complete, but last_checkpoint " "still names model_0000001.pth",
    ):
        checkpointer.save("model_0000002", iteration=2)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
