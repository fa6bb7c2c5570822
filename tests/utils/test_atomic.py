"""Atomic writes into the output folder: a failed write never damages the previous file."""

import errno
import os

import pytest

from dino_d2.utils import append_or_roll_back, atomic
from dino_d2.utils.atomic import atomic_write


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "last_checkpoint")
    atomic_write(path, lambda f: f.write("model_0000001.pth"), mode="w")

    def fail_halfway(f):
        f.write("model_00")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway, mode="w")
    assert open(path).read() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_append_rolls_back_a_partial_write(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    append_or_roll_back(str(path), b'{"iteration": 0}\n')
    real_write = os.write
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "write", half_then_full)
    with pytest.raises(OSError) as error:
        append_or_roll_back(str(path), b'{"iteration": 1, "loss": 2.5}\n')
    assert error.value.errno == errno.ENOSPC and len(calls) == 2
    assert path.read_bytes() == b'{"iteration": 0}\n'
    monkeypatch.undo()
    append_or_roll_back(str(path), b'{"iteration": 1}\n')
    assert path.read_bytes() == b'{"iteration": 0}\n{"iteration": 1}\n'
