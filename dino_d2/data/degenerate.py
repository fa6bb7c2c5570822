"""Degenerate boxes of a dataset: counted (vectorized, so that a cache of millions of boxes is
counted in a moment) and logged once per dataset and process; the DatasetMapper then clips or
drops them."""

import logging
from typing import Dict, List

import numpy as np

__all__ = [
    "degenerate_box_counts",
    "log_degenerate_counts",
    "log_degenerate_boxes",
    "forget_reported",
]

logger = logging.getLogger(__name__)

_REPORTED = set()


def degenerate_box_counts(boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> Dict:
    """Counts the degenerate boxes by kind.

    Args:
        boxes: ``(N, 4)`` boxes in absolute XYWH pixels (as in COCO jsons).
        widths: ``(N,)`` the width of each box's image.
        heights: ``(N,)`` the height of each box's image.

    Returns:
        ``{kind: count}`` for the kinds that occur: ``"non-finite"``, ``"empty"`` (width or
        height <= 0), ``"outside the image"`` and ``"partly outside the image (clipped)"``;
        each box is counted under its first kind in that order.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = boxes.T
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    with np.errstate(invalid="ignore"):
        non_finite = ~np.isfinite(boxes).all(axis=1)
        empty = ~non_finite & ((w <= 0) | (h <= 0))
        rest = ~(non_finite | empty)
        outside = rest & ((x >= widths) | (y >= heights) | (x + w <= 0) | (y + h <= 0))
        rest &= ~outside
        partly = rest & ((x < 0) | (y < 0) | (x + w > widths) | (y + h > heights))
    kinds = {
        "non-finite": non_finite,
        "empty": empty,
        "outside the image": outside,
        "partly outside the image (clipped)": partly,
    }
    return {kind: int(mask.sum()) for kind, mask in kinds.items() if mask.any()}


def log_degenerate_counts(counts: Dict, name: str) -> None:
    """Logs the counts of :func:`degenerate_box_counts`, once per dataset name and process."""
    if name in _REPORTED:
        return
    _REPORTED.add(name)
    if counts:
        summary = ", ".join(f"{n} {problem}" for problem, n in sorted(counts.items()))
        logger.warning(
            f"Dataset '{name}' has degenerate boxes: {summary}. The DatasetMapper clips boxes "
            "to the image and drops the empty ones."
        )


def log_degenerate_boxes(dataset_dicts: List[Dict], name: str) -> List[Dict]:
    """Counts a dataset's degenerate boxes and logs them, once per dataset name and process.

    Boxes (XYWH, as in COCO jsons) that are non-finite, empty (width or height <= 0) or wholly
    outside the image are dropped by the DatasetMapper; those partly outside are clipped.

    Args:
        dataset_dicts: Detectron2 dataset dicts (``width``, ``height``, ``annotations``).
        name: the dataset name, for the message.

    Returns:
        ``dataset_dicts``, unchanged.
    """
    if name in _REPORTED:
        return dataset_dicts
    boxes, widths, heights = [], [], []
    for record in dataset_dicts:
        for annotation in record.get("annotations", ()):
            if "bbox" in annotation:
                boxes.append([float(v) for v in annotation["bbox"]])
                widths.append(record["width"])
                heights.append(record["height"])
    log_degenerate_counts(degenerate_box_counts(boxes, widths, heights), name)
    return dataset_dicts


def forget_reported(name: str) -> None:
    """Lets the next load of ``name`` log its degenerate boxes again (a new registration)."""
    _REPORTED.discard(name)
