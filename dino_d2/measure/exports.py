"""Exported models timed beside the eager model they were made from, and compared with it.

An export (``tools/deploy/export_model.py``) takes one padded batch, ``(images, image_sizes)``,
of the dtype its ``model.json`` names (:func:`export_inputs`). :func:`time_export` times one on
the eager model's images (:func:`dino_d2.measure.timing.time_exported`) and pairs its
detections with the eager model's (:func:`dino_d2.export.verify.compare_detections`).
"""

import json
import logging
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..export.verify import compare_detections, detections_of_outputs, eager_detections
from .inputs import padded_batch
from .timing import time_exported

__all__ = ["ExportInfoError", "export_batches", "export_inputs", "time_export"]

logger = logging.getLogger(__name__)

# model.json's input_dtype -> the dtype of the image batch an export takes.
_EXPORT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


class ExportInfoError(ValueError):
    """The ``model.json`` beside an export holds a value the benchmark cannot use."""


def export_inputs(path: str) -> Tuple[torch.dtype, int]:
    """The image dtype and the smallest padded size of an export, from the ``model.json`` beside
    it (uint8 and no minimum without one).

    Raises:
        ExportInfoError: ``model.json`` is not a JSON object, or names an unknown dtype or a
            size that is not a non-negative integer.
    """
    json_path = os.path.join(os.path.dirname(path), "model.json")
    if not os.path.isfile(json_path):
        return torch.uint8, 0
    with open(json_path) as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as error:
            raise ExportInfoError(f"{json_path} is not valid JSON: {error}") from None
    if not isinstance(info, dict):
        raise ExportInfoError(f"{json_path} holds a {type(info).__name__}; expected an object")
    dtype = info.get("input_dtype", "uint8")
    if dtype not in _EXPORT_DTYPES:
        raise ExportInfoError(
            f"{json_path}: input_dtype is {dtype!r}; expected one of {sorted(_EXPORT_DTYPES)}"
        )
    min_size = info.get("min_input_size", 0)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ExportInfoError(
            f"{json_path}: min_input_size is {min_size!r}; expected a non-negative integer"
        )
    return _EXPORT_DTYPES[dtype], min_size


def export_batches(
    path: str, batches: Sequence[List[Dict]]
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` (lists of Detectron2 inputs) as the export at ``path`` takes them: padded
    ``(images, image_sizes)`` of the dtype its ``model.json`` names.

    Raises:
        ValueError: the batches are smaller than the export's smallest input size.
    """
    dtype, min_size = export_inputs(path)
    padded = [padded_batch(batch, dtype) for batch in batches]
    if min(padded[0][0].shape[-2:]) < min_size:
        raise ValueError(
            f"{path} takes images of at least {min_size} pixels a side (model.json's "
            f"min_input_size), got {tuple(padded[0][0].shape[-2:])}: give larger "
            "--height / --width"
        )
    return padded


def time_export(
    path: str,
    load: Callable[[str], Callable],
    model: nn.Module,
    batches: Sequence[List[Dict]],
    warmup: int,
) -> Dict:
    """Times the export at ``path`` on ``batches`` and compares its detections with ``model``'s.

    Args:
        path: the exported file (its ``model.json`` is read by :func:`export_inputs`).
        load: loads ``path`` into a callable ``(images, image_sizes) -> outputs`` (e.g.
            :func:`dino_d2.export.exporter.load_exported`); called once the inputs fit.
        model: the eager model the export was made from, in eval mode.
        batches: lists of Detectron2 inputs (dicts with ``image``), padded for the export.
        warmup: leading batches not timed; the detections of the first ``max(1, warmup)`` are
            compared.

    Returns:
        ``path``, the timings of :func:`~dino_d2.measure.timing.time_exported`, ``parity`` (a
        summary line), ``parity_passed``, ``max_score_diff`` and ``max_box_diff_px``.

    Raises:
        ValueError: the batches are smaller than the export's smallest input size.
    """
    padded = export_batches(path, batches)
    run = load(path)
    timings = time_exported(run, padded, warmup)
    pairs = []
    for index, (images, image_sizes) in enumerate(padded[: max(1, warmup)]):
        reference = eager_detections(model, images, image_sizes)
        exported = detections_of_outputs(run(images, image_sizes), image_sizes)
        pairs.extend(
            (ref, out, f"batch {index}, image {i}")
            for i, (ref, out) in enumerate(zip(reference, exported))
        )
    comparison = compare_detections(pairs)
    return {
        "path": path,
        **timings,
        "parity": comparison.summary(),
        "parity_passed": comparison.passed,
        "max_score_diff": comparison.max_score_diff,
        "max_box_diff_px": comparison.max_box_diff,
    }
