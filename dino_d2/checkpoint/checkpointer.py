"""A Detectron2 checkpointer whose files are never seen half-written.

Detectron2's ``DetectionCheckpointer`` (fvcore's ``Checkpointer.save``, the same on Detectron2
v0.6 and main) writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place: a job killed
during either write leaves a truncated checkpoint, or a ``last_checkpoint`` that is empty or names
one, and ``--resume`` then fails. :class:`AtomicCheckpointer` writes each file with
:func:`dino_d2.utils.atomic.atomic_write` (a temporary file in the same folder, flushed to
disk, renamed over the final name), so a reader sees either the old file or the complete new one.
``last_checkpoint`` is only updated, the same way, after the checkpoint it names is in place. A
killed job leaves at most a ``.<name>.<12 hex digits>.tmp`` file behind, which nothing reads; the
next job saving to that folder removes such files (those last written more than a second before
it started) after its first complete save.

A write that fails (a full disk, a folder that became read-only) removes its temporary file,
leaves the previous checkpoint and ``last_checkpoint`` as they were, and raises
:class:`dino_d2.utils.atomic.OutputWriteError` naming the folder, the checkpoint's size and
the free space, and the checkpoint ``last_checkpoint`` still names.

Reading a file goes through :func:`dino_d2.checkpoint.loading.load_checkpoint_file`: a checkpoint
whose pickle would run code is refused (:class:`~dino_d2.checkpoint.loading.UntrustedFileError`)
unless the checkpointer was made with ``unsafe_load=True``. The loaded data is then arranged as
Detectron2's ``DetectionCheckpointer._load_file`` arranges it (model-zoo ``.pkl`` files, Caffe2
blobs, pycls ``.pyth`` files, native ``.pth``).
"""

import io
import logging
import os
import time
from typing import Any, Dict

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.atomic import TEMPORARY_FILE, atomic_write, os_error_of, write_error
from .class_map import ClassMap, is_class_head, log_class_map, remap_class_rows
from .loading import load_checkpoint_file

__all__ = ["AtomicCheckpointer", "detectron2_layout"]

logger = logging.getLogger(__name__)

_MTIME_MARGIN = 1.0  # seconds


class _ByteCounter(io.RawIOBase):
    """A write-only sink that counts the bytes written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self.size += size
        return size


def _serialized_size(data: Dict[str, Any]) -> int:
    """The size of ``torch.save(data)``, measured without writing a file."""
    counter = _ByteCounter()
    torch.save(data, counter)
    return counter.size


def detectron2_layout(path: str, data: Any, log: logging.Logger) -> Dict[str, Any]:
    """A loaded file arranged as ``DetectionCheckpointer._load_file`` returns it.

    Args:
        path: the file's name (its extension says the format).
        data: what :func:`load_checkpoint_file` read from it.
        log: where to say whose model-zoo file it is.

    Returns:
        ``{"model": weights, ...}``; ``matching_heuristics`` is True for Caffe2 blobs and pycls
        files, whose names Detectron2 matches to the model's by heuristics.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}; a checkpoint is a dict")
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            log.info(f"Reading a file from '{data['__author__']}'")
            return data
        blobs = data.get("blobs", data)  # Caffe2 detection models have "blobs"
        weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    if path.endswith(".pyth"):
        if "model_state" not in data:
            raise ValueError(f"{path}: a pycls .pyth checkpoint must contain 'model_state'")
        weights = {
            k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


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

    Files are read by :func:`load_checkpoint_file`, without running code they carry; the
    keyword ``unsafe_load=True`` (a tool's ``--unsafe-load``) allows full unpickling, for
    files you trust.
    """

    def __init__(self, *args: Any, unsafe_load: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsafe_load = unsafe_load
        self._created = time.time()
        self._stale_files_removed = False
        self._class_map = None

    def load_with_class_map(self, path: str, class_map: ClassMap) -> Dict[str, Any]:
        """Loads the model weights of ``path`` (no other checkpointables), every class head
        gathered by ``class_map`` (:func:`dino_d2.checkpoint.class_map.remap_class_rows`), and
        logs one line counting the matched and unmatched classes.

        Returns:
            what Detectron2's ``load`` returns.
        """
        self._class_map = class_map
        try:
            loaded = self.load(path, checkpointables=[])
        finally:
            self._class_map = None
        log_class_map(class_map, path)
        return loaded

    def _load_file(self, filename: str) -> Dict[str, Any]:
        data = load_checkpoint_file(filename, unsafe=self.unsafe_load)
        return detectron2_layout(filename, data, self.logger)

    def _load_model(self, checkpoint: Any):
        if self._class_map is not None:
            model = self.model.module if hasattr(self.model, "module") else self.model
            checkpoint["model"] = remap_class_rows(
                checkpoint["model"], model.state_dict(), self._class_map
            )
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
            if name not in own or not is_class_head(name):
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
            if not (TEMPORARY_FILE.match(entry.name) and entry.is_file()):
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
        try:
            atomic_write(path, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as error:
            os_error = os_error_of(error)
            if os_error is None:
                raise
            raise write_error(
                os_error, path, needed_bytes=_serialized_size(data), kept=self._kept()
            ) from error
        self.tag_last_checkpoint(basename)
        if not self._stale_files_removed:
            self._remove_stale_temporary_files()

    def _last_tagged(self):
        """The checkpoint ``last_checkpoint`` names, or None."""
        try:
            with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _kept(self) -> str:
        """What a failed checkpoint write left as it was."""
        last = self._last_tagged()
        if last is None:
            return "The partial file was removed; the folder has no earlier checkpoint."
        return (
            f"The partial file was removed; last_checkpoint still names {last}, which is "
            "complete: --resume continues from it once the folder can take the file (or copy "
            "the folder elsewhere and set train.output_dir there)."
        )

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically writes ``save_dir/last_checkpoint`` naming ``last_filename_basename``."""
        if not self._is_local():
            super().tag_last_checkpoint(last_filename_basename)
            return
        path = os.path.join(self.save_dir, "last_checkpoint")
        try:
            atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")
        except OSError as error:
            raise write_error(
                error,
                path,
                needed_bytes=len(last_filename_basename),
                kept=(
                    f"{last_filename_basename} is complete, but last_checkpoint still names "
                    f"{self._last_tagged()}: --resume continues from that one."
                ),
            ) from error
