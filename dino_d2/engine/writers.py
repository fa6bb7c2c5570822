"""Detectron2's event writers with a ``metrics.json`` that a failed write never damages, and
errors that name the folder when the disk is full.

Detectron2's ``JSONWriter`` appends to ``metrics.json`` through a buffered file: when the disk
fills up, the file can end in half a line (``tools/plot_metrics.py`` and any JSON-lines reader
then fail) and the error names neither the file nor the space. :class:`JSONWriter` collects the
lines Detectron2's writer produces and appends them with
:func:`dino_d2.utils.atomic.append_or_roll_back`: all of them or none, and an
:class:`~dino_d2.utils.atomic.OutputWriteError` naming the folder and the free space. After
a failed write it writes nothing more; a failure while training is already stopping on another
error (the hooks' ``after_train``) is logged, so that it does not hide that error.

:class:`TensorboardXWriter` is Detectron2's, with the bare ``OSError`` of TensorBoard's writer
thread turned into an :class:`~dino_d2.utils.atomic.OutputWriteError` the same way (the
event file keeps what was written before; TensorBoard reads a file that ends in a partial
record up to that record).
"""

import logging
import os
import sys
from typing import List, Optional

from detectron2.utils.events import CommonMetricPrinter, EventWriter
from detectron2.utils.events import JSONWriter as _DetectronJSONWriter
from detectron2.utils.events import TensorboardXWriter as _DetectronTensorboardXWriter

from ..utils.atomic import append_or_roll_back, write_error

__all__ = ["JSONWriter", "TensorboardXWriter", "default_writers"]

logger = logging.getLogger(__name__)


class _Lines:
    """The file-like sink Detectron2's JSONWriter writes its lines to (no ``fileno``: it then
    skips its ``fsync``)."""

    def __init__(self) -> None:
        self.parts: List[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JSONWriter(_DetectronJSONWriter):
    """Detectron2's ``JSONWriter`` (same arguments and lines) with all-or-nothing appends.

    Args:
        json_file: the JSON-lines file; new lines are appended if it exists.
        window_size: the median-smoothing window of Detectron2's writer.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        super().__init__(json_file, window_size)
        self._file_handle.close()
        self._file_handle = _Lines()
        self._json_file = json_file
        self._failed = False

    def write(self) -> None:
        # Set while the trainer's after_train runs because training failed: a second error
        # must not hide the first.
        failing = sys.exc_info()[1]
        if self._failed:
            return
        super().write()
        data = "".join(self._file_handle.parts).encode("utf-8")
        self._file_handle.parts.clear()
        if not data:
            return
        try:
            append_or_roll_back(self._json_file, data)
        except OSError as error:
            self._failed = True  # later writes (after_train's) would fail the same way
            failure = write_error(
                error,
                self._json_file,
                needed_bytes=len(data),
                kept=f"{os.path.basename(self._json_file)} keeps its earlier lines, unchanged.",
            )
            if failing is not None:
                logger.error(str(failure))
                return
            raise failure from error


class TensorboardXWriter(_DetectronTensorboardXWriter):
    """Detectron2's ``TensorboardXWriter`` (same arguments) with clear write errors."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs):
        super().__init__(log_dir, window_size, **kwargs)
        self._log_dir = log_dir
        self._failed = False

    def _error(self, error: OSError, failing) -> None:
        self._failed = True
        failure = write_error(
            error,
            os.path.join(self._log_dir, "events"),
            name="the TensorBoard event file",
            kept="It keeps the events written before.",
        )
        if failing is not None:
            logger.error(str(failure))
            return
        raise failure from error

    def write(self) -> None:
        failing = sys.exc_info()[1]  # as in JSONWriter.write
        if self._failed:
            return
        try:
            super().write()
        except OSError as error:
            self._error(error, failing)

    def close(self) -> None:
        failing = sys.exc_info()[1]
        try:
            super().close()
        except OSError as error:
            if not self._failed:
                self._error(error, failing)


def default_writers(output_dir: str, max_iter: Optional[int] = None) -> List[EventWriter]:
    """Detectron2's ``default_writers`` with this module's :class:`JSONWriter` and
    :class:`TensorboardXWriter`.

    Args:
        output_dir: the folder of ``metrics.json`` and the TensorBoard events.
        max_iter: the number of iterations, for the ETA printed by ``CommonMetricPrinter``.
    """
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]
