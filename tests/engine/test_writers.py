"""metrics.json: the same lines as Detectron2's JSONWriter, appended all or nothing."""

import errno
import json
import logging
import os
import sys

import pytest

from detectron2.utils.events import EventStorage
from detectron2.utils.events import JSONWriter as DetectronJSONWriter

from dino_d2.utils import OutputWriteError, atomic
from dino_d2.engine.defaults import drop_log_files_on_error
from dino_d2.engine.writers import JSONWriter, TensorboardXWriter, default_writers


def _log_three_iterations(writers):
    with EventStorage(start_iter=0) as storage:
        for iteration in range(3):
            storage.iter = iteration
            storage.put_scalars(total_loss=10.0 - iteration, lr=0.1)
            storage.put_scalar("data_time", 0.01 * iteration, smoothing_hint=False)
            for writer in writers:
                writer.write()
    for writer in writers:
        writer.close()


def test_same_lines_as_detectron2(tmp_path):
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    ours.write_text('{"iteration": -1}\n')  # appended to, as Detectron2's
    theirs.write_text('{"iteration": -1}\n')
    _log_three_iterations([JSONWriter(str(ours)), DetectronJSONWriter(str(theirs))])
    assert ours.read_text() == theirs.read_text()
    assert [json.loads(line)["iteration"] for line in ours.read_text().splitlines()] == [
        -1,
        0,
        1,
        2,
    ]


def test_default_writers_use_the_atomic_json_writer(tmp_path):
    writers = default_writers(str(tmp_path / "out"), max_iter=10)
    assert [type(w).__name__ for w in writers] == [
        "CommonMetricPrinter",
        "JSONWriter",
        "TensorboardXWriter",
    ]
    assert isinstance(writers[1], JSONWriter) and isinstance(writers[2], TensorboardXWriter)
    for writer in writers:
        writer.close()


@pytest.fixture
def disk_full_after_half_a_write(monkeypatch):
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "write", half_then_full)


def test_a_full_disk_keeps_the_earlier_lines_and_names_the_folder(
    tmp_path, disk_full_after_half_a_write
):
    path = tmp_path / "metrics.json"
    earlier = '{"iteration": 0, "total_loss": 3.0}\n'
    path.write_text(earlier)
    writer = JSONWriter(str(path))
    with EventStorage(start_iter=1) as storage:
        storage.put_scalar("total_loss", 2.0)
        with pytest.raises(OutputWriteError) as error:
            writer.write()
        storage.iter = 2
        storage.put_scalar("total_loss", 1.0)
        writer.write()  # after a failure: nothing more is written, nothing raised
    message = str(error.value)
    assert message.startswith(f"Could not write metrics.json in {tmp_path}: No space left")
    assert "free" in message and "metrics.json keeps its earlier lines, unchanged." in message
    assert path.read_text() == earlier


def test_a_failure_while_training_already_failed_is_logged_not_raised(
    tmp_path, disk_full_after_half_a_write, caplog
):
    path = tmp_path / "metrics.json"
    writer = JSONWriter(str(path))
    with EventStorage(start_iter=0) as storage:
        storage.put_scalar("total_loss", 2.0)
        with caplog.at_level(logging.ERROR), pytest.raises(FloatingPointError, match="first"):
            try:
                raise FloatingPointError("the first error")
            finally:
                writer.write()  # as the hooks' after_train does
    assert any("Could not write metrics.json" in r.getMessage() for r in caplog.records)
    assert path.read_text() == ""


def test_tensorboard_write_errors_name_the_folder(tmp_path, monkeypatch):
    writer = TensorboardXWriter(str(tmp_path))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer._writer, "add_scalar", disk_full)
    with EventStorage(start_iter=0) as storage:
        storage.put_scalar("total_loss", 2.0)
        with pytest.raises(OutputWriteError) as error:
            writer.write()
        writer.write()  # nothing more after a failure
    assert str(error.value).startswith(
        f"Could not write the TensorBoard event file in {tmp_path}: No space left on device"
    )
    monkeypatch.undo()
    writer.close()


class _FullFile:
    name = "/somewhere/log.txt"

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass


def test_a_log_file_that_cannot_be_written_leaves_with_one_message(capsys):
    logger = logging.getLogger("test_writers.drop")
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    log_file = logging.StreamHandler(_FullFile())
    logger.handlers = [console, log_file]
    try:
        drop_log_files_on_error(logger)
        for k in range(3):
            logger.warning(f"line {k}")
    finally:
        logger.handlers = []
    captured = capsys.readouterr()
    assert captured.out == "line 0\nline 1\nline 2\n"
    assert captured.err == (
        "dino_d2: /somewhere/log.txt cannot be written ([Errno 28] No space left on device); "
        "logger 'test_writers.drop' logs to the console only from here on\n"
    )
    assert "Logging error" not in captured.err
