"""Reading a COCO instances json into Detectron2 dataset dicts, with errors that say where.

Detectron2's ``load_coco_json`` reports a malformed file with the bare error of whatever trips
over it first: ``JSONDecodeError: Unterminated string ...`` without the file's name, or
``could not convert string to float: ','`` for a ``bbox`` given as ``"10,10,5,5"``, without the
file or the annotation. Annotations whose ``image_id`` is not among the images are dropped.
:func:`read_coco_json` and :func:`check_coco_json` check the file first:

* a file that is not valid JSON raises :class:`CocoFormatError` naming the file and the dataset,
  with the line, the column and the text around the error;
* ``images`` and ``categories`` entries need an integer ``id`` (images: a ``file_name`` string
  and positive ``width`` / ``height``; categories: a ``name`` string); a bad one raises;
* an annotation needs an integer ``id`` (unique), an integer ``image_id``, an integer
  ``category_id`` listed in ``categories``, a ``bbox`` of 4 numbers ``[x, y, width, height]``
  (absolute pixels, XYWH) and, if it has one, an ``iscrowd`` of 0 or 1. A malformed annotation
  raises :class:`CocoFormatError` naming the file, the annotation id, the field, the value and
  what was expected, or, with ``skip_bad_annotations=True``, is skipped; the skipped ones are
  counted by field and logged in one warning;
* annotations whose ``image_id`` is not among the images are counted and logged in one warning
  naming the file (they are dropped, as by Detectron2).

The numbers themselves are not judged here: a NaN, empty or out-of-image box is a degenerate box
(see :func:`dino_d2.data.datasets.log_degenerate_boxes`), counted when the dataset is loaded.

:func:`coco_to_dataset_dicts` then builds the dataset dicts exactly as Detectron2's
``load_coco_json`` does for boxes (images sorted by id; ``file_name``, ``height``, ``width``,
``image_id``; annotations with ``bbox``, ``bbox_mode=XYWH_ABS``, the contiguous
``category_id`` and ``iscrowd`` when given). ``segmentation`` and ``keypoints`` are not loaded:
DINO uses neither.
"""

import json
import logging
import math
import numbers
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from detectron2.structures import BoxMode

__all__ = [
    "CocoFormatError",
    "CheckedCocoJson",
    "read_coco_json",
    "check_coco_json",
    "log_coco_problems",
    "coco_to_dataset_dicts",
    "SKIP_OPTION",
]

logger = logging.getLogger(__name__)

# How the training script's users ask for skipping (named in the errors).
SKIP_OPTION = "dataset.skip_bad_annotations=True"

_CONTEXT_CHARS = 60  # characters of the file shown on each side of a JSON syntax error
_EXAMPLES = 3  # malformed annotations described in a warning
_MISSING = object()


class CocoFormatError(ValueError):
    """A COCO json that is not valid JSON or has an entry of the wrong type or shape."""


@dataclass
class CheckedCocoJson:
    """A COCO json's content after :func:`check_coco_json`.

    Attributes:
        images: the ``images`` entries, as in the file.
        categories: the ``categories`` entries, as in the file.
        annotations: the well-formed annotations whose image is among ``images``.
        skipped: malformed annotations skipped, counted by the first bad field.
        unmatched: well-formed annotations whose ``image_id`` is not among the images.
        examples: a description of the first few skipped or unmatched annotations.
    """

    images: List[Dict]
    categories: List[Dict]
    annotations: List[Dict]
    skipped: Counter = field(default_factory=Counter)
    unmatched: int = 0
    examples: List[str] = field(default_factory=list)


def _where(json_file: str, dataset_name: Optional[str]) -> str:
    return f"{json_file} (dataset '{dataset_name}')" if dataset_name else json_file


def _excerpt(text: str, position: int) -> str:
    """The line of ``text`` around ``position``, cut to a window, with a caret under it."""
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    end = len(text) if end < 0 else end
    left = max(start, position - _CONTEXT_CHARS)
    right = min(end, position + _CONTEXT_CHARS)
    prefix = "..." if left > start else ""
    suffix = "..." if right < end else ""
    line = prefix + text[left:right] + suffix
    caret = " " * (len(prefix) + position - left) + "^"
    return f"    {line}\n    {caret}"


def read_coco_json(json_file: str, dataset_name: Optional[str] = None) -> Dict:
    """Reads a COCO json file.

    Args:
        json_file: the file.
        dataset_name: named in the errors.

    Returns:
        the parsed json object (a dict).

    Raises:
        CocoFormatError: the file is not UTF-8 JSON, or not a JSON object; the message names the
            file and the dataset and, for a syntax error, gives the line, the column and the
            text around the error.
    """
    where = _where(json_file, dataset_name)
    with open(json_file, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CocoFormatError(
            f"{where} is not UTF-8 text (byte {error.start}: {error.reason}); a COCO json is "
            "UTF-8 JSON"
        ) from error
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        truncated = not text.rstrip().endswith("}")
        hint = (
            "\nThe file does not end with '}': is it truncated (an interrupted copy or download)?"
        )
        raise CocoFormatError(
            f"{where} is not valid JSON: {error.msg}: line {error.lineno}, column {error.colno} "
            f"(character {error.pos} of {len(text)}):\n{_excerpt(text, error.pos)}"
            + (hint if truncated else "")
        ) from error
    if not isinstance(content, dict):
        raise CocoFormatError(
            f"{where} holds a JSON {type(content).__name__}; a COCO json is an object with "
            "'images', 'annotations' and 'categories'"
        )
    return content


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A value as the json has it, with its kind: ``"10,10,5,5" (a string)``."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    finite = not isinstance(value, float) or math.isfinite(value)
    text = json.dumps(value) if finite else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, str):
        return f"{text} (a string)"
    if isinstance(value, list):
        return f"{text} (a list of {len(value)})"
    return f"{text} ({type(value).__name__})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _entries(content: Dict, key: str, where: str, *, required: bool) -> List:
    value = content.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise CocoFormatError(
            f"{where}: '{key}' is {_shown(value)}; expected a list of objects"
            if key in content
            else f"{where} has no '{key}'; a COCO instances json needs it"
        )
    return value


def _check_images(images: List, where: str) -> set:
    ids = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            raise CocoFormatError(
                f"{where}: images[{index}] is {_shown(image)}; expected an object"
            )
        name = f"image id {image.get('id')!r} (images[{index}])"
        if not _is_int(image.get("id")):
            raise CocoFormatError(
                f"{where}: images[{index}] has 'id' {_shown(image.get('id', _MISSING))}; "
                "expected an integer"
            )
        if image["id"] in ids:
            raise CocoFormatError(f"{where}: {name}: the id is used by another image too")
        if not isinstance(image.get("file_name"), str):
            raise CocoFormatError(
                f"{where}: {name} has 'file_name' {_shown(image.get('file_name', _MISSING))}; "
                "expected "
                "a string (the path relative to the image folder)"
            )
        for key in ("width", "height"):
            if not (_is_number(image.get(key)) and image[key] > 0):
                raise CocoFormatError(
                    f"{where}: {name} has '{key}' {_shown(image.get(key, _MISSING))}; expected a "
                    "positive "
                    "number of pixels"
                )
        ids.add(image["id"])
    return ids


def _check_categories(categories: List, where: str) -> set:
    ids = set()
    for index, category in enumerate(categories):
        ok = isinstance(category, dict) and _is_int(category.get("id"))
        if not (ok and isinstance(category.get("name"), str)):
            raise CocoFormatError(
                f"{where}: categories[{index}] is {_shown(category)}; expected an object with "
                "an integer 'id' and a string 'name'"
            )
        if category["id"] in ids:
            raise CocoFormatError(f"{where}: category id {category['id']} is listed twice")
        ids.add(category["id"])
    return ids


def _annotation_problem(annotation: Any, category_ids: set, seen_ids: set):
    """``(field, value, expected)`` of an annotation's first malformed field, or None."""
    if not isinstance(annotation, dict):
        return "annotation", annotation, "an object"
    checks = (
        ("id", _is_int, "an integer, unique in the file"),
        ("image_id", _is_int, "an integer (the 'id' of an entry of 'images')"),
        ("category_id", _is_int, "an integer (the 'id' of an entry of 'categories')"),
        (
            "bbox",
            lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
            "a list of 4 numbers [x, y, width, height] in pixels",
        ),
    )
    for key, ok, expected in checks:
        if not ok(annotation.get(key)):
            return key, annotation.get(key, _MISSING), expected
    if annotation["id"] in seen_ids:
        return "id", annotation["id"], "an integer, unique in the file (this one is repeated)"
    if annotation["category_id"] not in category_ids:
        listed = sorted(category_ids)
        shown = listed[:10] + (["..."] if len(listed) > 10 else [])
        return "category_id", annotation["category_id"], f"one of the category ids {shown}"
    if annotation.get("iscrowd", 0) not in (0, 1):
        return "iscrowd", annotation["iscrowd"], "0 or 1"
    return None


def check_coco_json(
    content: Dict,
    json_file: str,
    dataset_name: Optional[str] = None,
    *,
    skip_bad_annotations: bool = False,
) -> CheckedCocoJson:
    """Checks the entries of a parsed COCO json (see the module docstring).

    Args:
        content: the parsed json (:func:`read_coco_json`).
        json_file: its file, named in the errors.
        dataset_name: named in the errors.
        skip_bad_annotations: skip malformed annotations (counted in ``skipped``) instead of
            raising.

    Returns:
        the checked content; nothing is logged here.

    Raises:
        CocoFormatError: a malformed image or category entry, or (unless skipping) annotation,
            naming the file, the entry's id, the field and what was expected.
    """
    where = _where(json_file, dataset_name)
    images = _entries(content, "images", where, required=True)
    categories = _entries(content, "categories", where, required=True)
    annotations = _entries(content, "annotations", where, required=False)
    image_ids = _check_images(images, where)
    category_ids = _check_categories(categories, where)
    result = CheckedCocoJson(images=images, categories=categories, annotations=[])
    seen_ids = set()
    for index, annotation in enumerate(annotations):
        problem = _annotation_problem(annotation, category_ids, seen_ids)
        if problem is not None:
            key, value, expected = problem
            name = f"annotations[{index}]"
            if isinstance(annotation, dict) and _is_int(annotation.get("id")):
                name = f"annotation id {annotation['id']} ({name})"
            description = f"{name}: '{key}' is {_shown(value)}; expected {expected}"
            if not skip_bad_annotations:
                raise CocoFormatError(
                    f"{where}: {description}. Fix the file, or set {SKIP_OPTION} to skip "
                    "malformed annotations (with one warning counting them)."
                )
            result.skipped[key] += 1
            if len(result.examples) < _EXAMPLES:
                result.examples.append(description)
            continue
        seen_ids.add(annotation["id"])
        if annotation["image_id"] not in image_ids:
            result.unmatched += 1
            if len(result.examples) < _EXAMPLES:
                result.examples.append(
                    f"annotation id {annotation['id']}: image_id {annotation['image_id']} is "
                    "not among the images"
                )
            continue
        result.annotations.append(annotation)
    return result


def log_coco_problems(checked: CheckedCocoJson, json_file: str, dataset_name: str) -> None:
    """Logs one warning for the skipped and the unmatched annotations of a checked json."""
    parts = []
    if checked.skipped:
        total = sum(checked.skipped.values())
        kinds = ", ".join(f"{n} with a bad '{k}'" for k, n in sorted(checked.skipped.items()))
        parts.append(f"{_plural(total, 'malformed annotation')} skipped ({kinds})")
    if checked.unmatched:
        parts.append(
            f"{_plural(checked.unmatched, 'annotation')} dropped: the image_id is not among the "
            "images"
        )
    if parts:
        logger.warning(
            f"{_where(json_file, dataset_name)}: "
            + "; ".join(parts)
            + ". For example: "
            + "; ".join(checked.examples)
            + "."
        )


def coco_to_dataset_dicts(
    checked: CheckedCocoJson, image_root: str, id_map: Dict[int, int]
) -> List[Dict]:
    """Detectron2 dataset dicts of a checked json, as ``load_coco_json`` builds them for boxes.

    Args:
        checked: the checked json.
        image_root: the folder the images' ``file_name`` entries are relative to.
        id_map: json category id -> contiguous id ``0..K-1``.

    Returns:
        one dict per image, sorted by image id, with ``annotations`` (boxes in absolute XYWH).
    """
    by_image = defaultdict(list)
    for annotation in checked.annotations:
        obj = {"bbox": annotation["bbox"], "bbox_mode": BoxMode.XYWH_ABS}
        obj["category_id"] = id_map[annotation["category_id"]]
        if "iscrowd" in annotation:
            obj["iscrowd"] = annotation["iscrowd"]
        by_image[annotation["image_id"]].append(obj)
    return [
        {
            "file_name": os.path.join(image_root, image["file_name"]),
            "height": image["height"],
            "width": image["width"],
            "image_id": image["id"],
            "annotations": by_image[image["id"]],
        }
        for image in sorted(checked.images, key=lambda image: image["id"])
    ]
