"""Detectron2's ``COCOEvaluator`` with output files that are replaced whole or not at all.

Detectron2's evaluator writes ``instances_predictions.pth`` and ``coco_instances_results.json``
in place: a full disk or a read-only folder truncates the files of the previous evaluation and
raises a bare ``OSError``. :class:`COCOEvaluator` lets Detectron2 write them into a staging folder
inside the output folder (``.coco_eval.<12 hex digits>.tmp/``), then moves each complete file
over the old one (``os.replace``, atomic). A failed write leaves the old files as they were,
removes the staging folder and raises :class:`dino_d2.utils.OutputWriteError` naming the
folder and the free space. A staging folder left by a killed job is removed by the next
evaluation in that output folder.
"""

import os
import re
import shutil
import time
import uuid

from detectron2.evaluation import COCOEvaluator as _DetectronCOCOEvaluator
from detectron2.utils import comm

from ..utils.atomic import fsync_dir, os_error_of, write_error

__all__ = ["COCOEvaluator"]

_STAGING = re.compile(r"^\.coco_eval\.[0-9a-f]{12}\.tmp$")
_MTIME_MARGIN = 1.0  # seconds


def _failed_file(error: OSError, staging: str) -> str:
    """The name of the file a failed evaluation write was writing."""
    if isinstance(error.filename, str):
        return os.path.basename(error.filename)
    try:
        entries = sorted(os.scandir(staging), key=lambda e: e.stat().st_mtime_ns)
    except OSError:
        entries = []
    return entries[-1].name if entries else "the evaluation results"


class COCOEvaluator(_DetectronCOCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (same arguments and results), with atomic output files."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._created = time.time()

    def _remove_stale_staging(self, output_dir: str) -> None:
        for entry in os.scandir(output_dir):
            if not (_STAGING.match(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            if entry.stat().st_mtime < self._created - _MTIME_MARGIN:
                shutil.rmtree(entry.path, ignore_errors=True)

    def evaluate(self, img_ids=None):
        output_dir = self._output_dir
        if not output_dir or "://" in output_dir or not comm.is_main_process():
            return super().evaluate(img_ids)
        staging = os.path.join(output_dir, f".coco_eval.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.makedirs(output_dir, exist_ok=True)
            self._remove_stale_staging(output_dir)
            os.mkdir(staging)
            self._output_dir = staging
            results = super().evaluate(img_ids)
            for name in sorted(os.listdir(staging)):
                with open(os.path.join(staging, name), "rb") as f:
                    os.fsync(f.fileno())
                os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        except (OSError, RuntimeError) as error:
            os_error = os_error_of(error)
            if os_error is None:
                raise
            name = _failed_file(os_error, staging)
            raise write_error(
                os_error,
                os.path.join(output_dir, name),
                kept="The evaluation files already in the folder are unchanged.",
            ) from error
        finally:
            self._output_dir = output_dir
            shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(output_dir)
        return results
