"""COCO ``segmentation`` values: what a well-formed one is, and the form the loaders keep.

A COCO instance annotation's ``segmentation`` is one of:

* polygons: a list of polygons, each a flat list ``[x0, y0, x1, y1, ...]`` of absolute pixel
  coordinates (the parts of one instance, united);
* RLE: ``{"size": [height, width], "counts": ...}`` with ``counts`` either a compressed string
  (pycocotools' ``mask.encode``, what the digits dataset writes) or a list of run lengths
  (uncompressed, used by COCO for crowd regions);
* an empty list, or no key: no mask.

:func:`segmentation_problem` says what is wrong with a malformed value (the json checks of
:mod:`dino_d2.data.coco_json` report it like a malformed box). :func:`usable_segmentation` gives
what the dataset dicts carry, the way Detectron2's ``load_coco_json`` keeps it: polygons with
fewer than 3 points (or an odd number of coordinates) are dropped, an uncompressed RLE is
compressed, and a compressed RLE's ``counts`` is a ``str`` (so it is JSON and pickles small).
"""

import numbers
from typing import Any, Dict, List, Optional, Union

from pycocotools import mask as mask_util

__all__ = ["SEGMENTATION_EXPECTED", "segmentation_problem", "usable_segmentation"]

SEGMENTATION_EXPECTED = (
    "polygons (a list of lists of x, y pixel coordinates) or an RLE "
    '{"size": [height, width], "counts": a string or a list of run lengths}'
)

Segmentation = Union[List[List[float]], Dict[str, Any]]


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _is_coordinate(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def segmentation_problem(value: Any) -> Optional[str]:
    """None for a well-formed ``segmentation`` value, else what was expected instead."""
    if isinstance(value, list):
        if all(isinstance(p, list) and all(_is_coordinate(v) for v in p) for p in value):
            return None
        return SEGMENTATION_EXPECTED
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_count(v) for v in size)):
            return SEGMENTATION_EXPECTED + " ('size' is not two non-negative integers)"
        if isinstance(counts, str) or (
            isinstance(counts, list) and all(_is_count(v) for v in counts)
        ):
            return None
        return SEGMENTATION_EXPECTED + " ('counts' is neither)"
    return SEGMENTATION_EXPECTED


def usable_segmentation(value: Any) -> Optional[Segmentation]:
    """The form of a well-formed ``segmentation`` that the dataset dicts carry.

    Args:
        value: a value :func:`segmentation_problem` accepts.

    Returns:
        polygons with at least 3 points each (None when none is left, or for an empty list),
        or a compressed RLE ``{"size": [h, w], "counts": str}``.
    """
    if isinstance(value, list):
        polygons = [p for p in value if len(p) % 2 == 0 and len(p) >= 6]
        return polygons or None
    height, width = (int(v) for v in value["size"])
    counts = value["counts"]
    if isinstance(counts, list):
        counts = mask_util.frPyObjects(value, height, width)["counts"].decode("ascii")
    return {"size": [height, width], "counts": counts}
