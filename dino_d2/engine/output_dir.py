"""The output folder at the start of a job: writable, and not holding another run's checkpoints.

:func:`prepare_output_dir` runs in the main process before anything is written there:

1. it checks that ``train.output_dir`` is writable (a read-only folder would otherwise fail at
   the first checkpoint, possibly hours later);
2. if the folder holds checkpoints (``last_checkpoint`` or ``model_*.pth``) and the
   ``config.yaml`` saved beside them differs from this job's config in the model (``model``) or
   in the training datasets (``dataloader.train.dataset.names``), they are another run's: a new
   training run warns before it overwrites anything, and ``--resume`` stops with
   :class:`OutputDirConflictError` (it would load those weights into a different model);
3. it saves this job's config as ``config.yaml``, atomically.

Other differences (``train.max_iter``, the optimizer, the schedule, ...) are what a resumed run
may change: they are not reported.
"""

import errno
import glob
import logging
import os
import pickletools
import shutil
import uuid
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from detectron2.config import LazyConfig

from ..utils.atomic import OutputWriteError, format_size, fsync_dir
from ..model_zoo import load_config_file

__all__ = [
    "OutputDirConflictError",
    "prepare_output_dir",
    "check_writable",
    "config_differences",
    "COMPARED_KEYS",
]

logger = logging.getLogger(__name__)

# What a checkpoint belongs to: the model, and the data it was trained on.
COMPARED_KEYS = ("model", "dataloader.train.dataset.names")
_SHOWN_DIFFERENCES = 5


class OutputDirConflictError(RuntimeError):
    """``--resume`` in a folder whose checkpoints come from another config."""


def check_writable(output_dir: str) -> None:
    """Raises :class:`OutputWriteError` if a file cannot be created in ``output_dir``."""
    probe = os.path.join(output_dir, f".write_test.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        free = _free(output_dir)
        raise OutputWriteError(
            f"train.output_dir {os.path.abspath(output_dir)} is not writable: "
            f"{error.strerror or error}. The job writes its checkpoints, metrics.json and "
            f"config.yaml there ({format_size(free)} free). Choose a writable train.output_dir.",
            folder=os.path.abspath(output_dir),
            free_bytes=free,
            code=error.errno,
        ) from error


def _free(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _checkpoints(output_dir: str) -> Tuple[Optional[str], List[str]]:
    """What ``last_checkpoint`` names (or None), and the ``model_*.pth`` files."""
    last = None
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            last = f.read().strip() or None
    except OSError:
        pass
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "model_*.pth")))
    return last, files


def _select(container: Dict, key: str):
    node = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _differences(old, new, prefix: str, found: List[Tuple[str, object, object]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            _differences(
                old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}.{key}", found
            )
    elif old != new:
        found.append((prefix, old, new))


def config_differences(old: Dict, new: Dict) -> List[Tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for the :data:`COMPARED_KEYS` that differ.

    Args:
        old, new: configs as plain containers (``OmegaConf.to_container(..., resolve=False)``
            of configs loaded from yaml, so that targets are strings in both).
    """
    found = []
    for key in COMPARED_KEYS:
        _differences(_select(old, key), _select(new, key), key, found)
    return found


def _load_container(path: str) -> Optional[Dict]:
    try:
        return OmegaConf.to_container(load_config_file(path), resolve=False)
    except Exception as error:  # a yaml we cannot read says nothing about the run
        logger.info(f"Could not read {path} ({type(error).__name__}: {error}); not compared")
        return None


def _complete_pickle(path: str) -> bool:
    """Whether ``path`` is a complete pickle (LazyConfig.save's fallback for a config that
    cannot be written as yaml), judged by walking its opcodes to the final STOP with
    ``pickletools.genops``: nothing in it is unpickled, so nothing it refers to runs."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    last = None
    try:
        for last, _, _ in pickletools.genops(data):
            pass
    except ValueError:  # an unknown opcode, or the data ends before STOP: cut short
        return False
    return last is not None and last.name == "STOP"


def _same_keys(a, b) -> bool:
    """Whether two nested containers have the same keys at every level (values not compared)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_keys(a[k], b[k]) for k in a)
    return isinstance(a, dict) == isinstance(b, dict)


def _describe(differences: List[Tuple[str, object, object]]) -> str:
    shown = [f"{key} ({old!r} -> {new!r})" for key, old, new in differences[:_SHOWN_DIFFERENCES]]
    more = len(differences) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _check_previous_run(
    output_dir: str, saved: Optional[Dict], new: Optional[Dict], resume: bool
) -> None:
    last, files = _checkpoints(output_dir)
    if last is None and not files:
        return
    held = f"last_checkpoint: {last}" if last else f"{len(files)} model_*.pth files"
    if saved is None or new is None:
        if not resume:
            logger.warning(
                f"train.output_dir {output_dir} holds checkpoints ({held}) but no readable "
                "config.yaml: training from scratch here overwrites them at the same iterations "
                "and replaces last_checkpoint."
            )
        return
    differences = config_differences(saved, new)
    if not differences:
        return
    what = (
        f"train.output_dir {output_dir} holds the checkpoints of another run ({held}), whose "
        f"config.yaml differs from this config in {_describe(differences)}"
    )
    if resume:
        last_path = os.path.join(output_dir, last or files[-1])
        raise OutputDirConflictError(
            f"--resume stopped: {what}. Resuming would load that run's weights into a different "
            "model. Resume it with its own config, or choose another train.output_dir (to "
            f"start from its weights instead, use train.init_checkpoint={last_path} without "
            "--resume)."
        )
    logger.warning(
        f"{what}. This run replaces its config.yaml and last_checkpoint and overwrites its "
        "checkpoints at the same iterations; use another train.output_dir to keep them."
    )


def prepare_output_dir(cfg: DictConfig, resume: bool) -> str:
    """Checks ``cfg.train.output_dir`` and saves ``config.yaml`` there (see module doc).

    Call it in the main process only, before anything else is written to the folder.

    Args:
        cfg: the job's config, overrides applied.
        resume: whether the job resumes from the folder's last checkpoint.

    Returns:
        the path of the saved ``config.yaml``.

    Raises:
        OutputWriteError: the folder is not writable.
        OutputDirConflictError: ``resume`` and the folder holds another config's checkpoints.
    """
    output_dir = cfg.train.output_dir
    os.makedirs(output_dir, exist_ok=True)
    check_writable(output_dir)
    path = os.path.join(output_dir, "config.yaml")
    # LazyConfig.load wants a .yaml name.
    staged = os.path.join(output_dir, f".config.{uuid.uuid4().hex[:12]}.tmp.yaml")
    pickled = staged + ".pkl"
    try:
        # LazyConfig.save logs its errors instead of raising: judge by what it wrote.
        LazyConfig.save(cfg, staged)
        new = _load_container(staged) if os.path.isfile(staged) else None
        if new is not None and not _same_keys(new, OmegaConf.to_container(cfg, resolve=False)):
            new = None  # a write cut short can still parse, without the keys after the cut
        if new is None and not _complete_pickle(pickled):
            free = _free(output_dir)
            raise OutputWriteError(
                f"Could not write config.yaml in {os.path.abspath(output_dir)}: the written file "
                f"is incomplete (the folder's file system has {format_size(free)} free; is the "
                "disk full?). Make room or choose another train.output_dir.",
                folder=os.path.abspath(output_dir),
                free_bytes=free,
                code=errno.ENOSPC,
            )
        saved = _load_container(path) if os.path.isfile(path) else None
        _check_previous_run(output_dir, saved, new, resume)
        if new is None:
            # Not expressible as yaml: Detectron2 wrote a readable yaml and a pickle beside it.
            os.replace(pickled, path + ".pkl")
        if os.path.isfile(staged):
            os.replace(staged, path)
    finally:
        for leftover in (staged, pickled):
            if os.path.exists(leftover):
                os.remove(leftover)
    fsync_dir(output_dir)
    return path
