"""A Detectron2 checkpointer whose files are never seen half-written.

Detectron2's ``DetectionCheckpointer`` (fvcore's ``Checkpointer.save``, the same on Detectron2
v0.6 and main) writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place: a job killed
during either write leaves a truncated checkpoint, or a ``last_checkpoint`` that is empty or names
one, and ``--resume`` then fails. :class:`AtomicCheckpointer` writes each file to a temporary file
in the same folder, flushes it to disk (``fsync``) and renames it over the final name
(``os.replace``, atomic on POSIX and Windows), so a reader sees either the old file or the complete
new one. ``last_checkpoint`` is only updated, the same way, after the checkpoint it names is in
place. A killed job leaves at most a ``.<name>.<12 hex digits>.tmp`` file behind, which nothing
reads; the next job saving to that folder removes such files (those last written more than a
second before it started) after its first complete save.

Test seam: the environment variable ``DINO_D2_CHECKPOINT_WRITE_DELAY`` (seconds, a float) makes
:meth:`AtomicCheckpointer.save` sleep after the temporary file is complete and before it is
renamed, so that a test can kill the process in that window. It is read at every save; unset or
empty means no delay. Do not set it outside tests.
"""

import logging
import os
import re
import time
import uuid
from typing import IO, Any, Callable, Dict

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "atomic_write", "WRITE_DELAY_ENV"]

logger = logging.getLogger(__name__)

WRITE_DELAY_ENV = "DINO_D2_CHECKPOINT_WRITE_DELAY"

# The temporary files of atomic_write: ".<final name>.<12 hex digits>.tmp".
_TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_MTIME_MARGIN = 1.0  # seconds


def _is_class_head(name: str) -> bool:
    """Parameters with one row per class: the encoder / decoder class heads (``class_embed``,
    ``class_embed.<layer>``) and the denoising label embedding."""
    return ".class_embed." in f".{name}" or name.endswith("label_enc.weight")


def _write_delay() -> float:
    value = os.environ.get(WRITE_DELAY_ENV, "")
    return float(value) if value else 0.0


def _fsync_dir(folder: str) -> None:
    """Makes a rename in ``folder`` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO], None], *, mode: str = "wb") -> None:
    """Writes ``path`` through a temporary file in its folder, then renames it into place.

    Args:
        path: the final local file path.
        write: called with the open temporary file; writes the whole content.
        mode: ``"wb"`` or ``"w"``.

    On any error (or a kill) before the rename, ``path`` is left as it was; on an error the
    temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # Permissions as for a file opened normally (the umask applies), unlike tempfile's 0600.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        delay = _write_delay()
        if delay > 0:
            logger.warning(f"{WRITE_DELAY_ENV}: sleeping {delay}s before renaming {path}")
            time.sleep(delay)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(folder)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes of the checkpoints and ``last_checkpoint``.

    Same constructor and methods as Detectron2's. Only local ``save_dir`` folders are written
    atomically; other storage (a ``scheme://`` path of Detectron2's PathManager) is written as
    Detectron2 does, with a warning.

    Loading is Detectron2's, which skips weights whose shapes differ from the model's. When the
    class heads are among them (a checkpoint for another number of classes), a warning says so,
    naming ``model.num_classes`` and the checkpoint's number: when fine-tuning on another
    dataset this is expected (the class heads start from scratch), otherwise set
    ``model.num_classes`` to the checkpoint's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._created = time.time()
        self._stale_files_removed = False

    def _load_model(self, checkpoint: Any):
        self._warn_about_class_heads(checkpoint.get("model", {}))
        return super()._load_model(checkpoint)

    def _warn_about_class_heads(self, weights: Dict[str, Any]) -> None:
        model = self.model.module if hasattr(self.model, "module") else self.model
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            return
        own = model.state_dict()
        found = set()
        for name, value in weights.items():
            if name not in own or not _is_class_head(name):
                continue
            shape = tuple(getattr(value, "shape", ()))
            if shape and shape != tuple(own[name].shape) and own[name].shape[0] == num_classes:
                found.add(int(shape[0]))
        if found:
            logger.warning(
                f"The checkpoint's class heads have {sorted(found)} classes, the model "
                f"(model.num_classes) {num_classes}: they are not loaded and start from scratch. "
                "Expected when fine-tuning on another dataset; otherwise set "
                f"model.num_classes={min(found)}."
            )

    def _remove_stale_temporary_files(self) -> None:
        """Removes the temporary files of writes killed before this checkpointer was created."""
        for entry in os.scandir(self.save_dir):
            if not (_TEMPORARY_FILE.match(entry.name) and entry.is_file()):
                continue
            # File times come from a coarse clock that lags time.time() by up to a tick: a
            # margin keeps a file written just after this checkpointer's creation.
            if entry.stat().st_mtime < self._created - _MTIME_MARGIN:
                os.remove(entry.path)
                self.logger.info(f"Removed {entry.path}, left by an interrupted checkpoint write")
        self._stale_files_removed = True

    def _is_local(self) -> bool:
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """Writes ``save_dir/<name>.pth`` (model, checkpointables and ``kwargs``), then points
        ``last_checkpoint`` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            logger.warning(f"{self.save_dir} is not a local folder: checkpoint written in place")
            super().save(name, **kwargs)
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        if os.path.basename(path) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)
        if not self._stale_files_removed:
            self._remove_stale_temporary_files()

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically writes ``save_dir/last_checkpoint`` naming ``last_filename_basename``."""
        if not self._is_local():
            super().tag_last_checkpoint(last_filename_basename)
            return
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )
