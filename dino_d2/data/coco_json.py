"""Reading a COCO instances json into Detectron2 dataset dicts, with errors that say where.

Detectron2's ``load_coco_json`` reports a malformed file with the bare error of whatever trips
over it first: ``JSONDecodeError: Unterminated string ...`` without the file's name, or
``could not convert string to float: ','`` for a ``bbox`` given as ``"10,10,5,5"``, without the
file or the annotation. Annotations whose ``image_id`` is not among the images are dropped.
:func:`dino_d2.data.coco_reader.read_coco_json` and :func:`check_coco_json` check the file first
(the cache of :mod:`dino_d2.data.coco_cache` calls the same per-entry checks, :func:`check_image`,
:func:`check_categories` and :class:`AnnotationChecker`, on the streamed entries):

* a file that is not valid JSON raises :class:`CocoFormatError` naming the file and the dataset,
  with the line, the column and the text around the error;
* ``images`` and ``categories`` entries need an integer ``id`` (images: a ``file_name`` string
  and positive ``width`` / ``height``; categories: a ``name`` string); a bad one raises;
* an annotation needs an integer ``id`` (unique), an integer ``image_id``, an integer
  ``category_id`` listed in ``categories``, a ``bbox`` of 4 numbers ``[x, y, width, height]``
  (absolute pixels, XYWH), if it has one, an ``iscrowd`` of 0 or 1 and, if it has one, a
  ``segmentation`` of polygons or RLE (:mod:`dino_d2.data.segmentation`). A malformed annotation
  raises :class:`CocoFormatError` naming the file, the annotation id, the field, the value and
  what was expected, or, with ``skip_bad_annotations=True``, is skipped; the skipped ones are
  counted by field and logged in one warning;
* annotations whose ``image_id`` is not among the images are counted and logged in one warning
  naming the file (they are dropped, as by Detectron2);
* images whose ``file_name`` leaves the image folder (absolute, or ``..`` first) are counted;
  :func:`check_images_inside_root` refuses them unless they are allowed, and then
  :func:`log_coco_problems` warns once.

The numbers themselves are not judged here: a NaN, empty or out-of-image box is a degenerate box
(see :mod:`dino_d2.data.degenerate`), counted when the dataset is loaded.

:func:`coco_to_dataset_dicts` then builds the dataset dicts exactly as Detectron2's
``load_coco_json`` does for boxes (images sorted by id; ``file_name``, ``height``, ``width``,
``image_id``; annotations with ``bbox``, ``bbox_mode=XYWH_ABS``, the contiguous
``category_id``, ``iscrowd`` when given and ``segmentation`` when the annotation has a usable one
(:func:`dino_d2.data.segmentation.usable_segmentation`: polygons of at least 3 points, RLE with
``str`` counts), for mask training and ``segm`` evaluation. An annotation whose polygons are all
too short keeps its box without a ``segmentation`` (Detectron2 drops such an instance; a box
detector should not lose it). ``keypoints`` are not loaded. The mapper drops the segmentation
unless it is asked for masks (:class:`dino_d2.data.mapper.DatasetMapper`).
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

from .segmentation import segmentation_problem, usable_segmentation

__all__ = [
    "CocoFormatError",
    "CocoProblems",
    "CheckedCocoJson",
    "file_and_dataset",
    "entries_of",
    "points_outside_root",
    "check_image",
    "check_categories",
    "AnnotationChecker",
    "malformed_annotation_error",
    "note_outside_root",
    "check_coco_json",
    "check_images_inside_root",
    "log_coco_problems",
    "coco_to_dataset_dicts",
    "SKIP_OPTION",
    "OUTSIDE_ROOT_OPTION",
]

logger = logging.getLogger(__name__)

# How the training script's users ask for skipping (named in the errors).
SKIP_OPTION = "dataset.skip_bad_annotations=True"
OUTSIDE_ROOT_OPTION = "dataset.allow_images_outside_root=True"

_EXAMPLES = 3  # malformed annotations described in a warning
_MISSING = object()


class CocoFormatError(ValueError):
    """A COCO json that is not valid JSON or has an entry of the wrong type or shape."""


@dataclass
class CocoProblems:
    """What checking a COCO json's entries found, short of an error.

    Attributes:
        skipped: malformed annotations skipped, counted by the first bad field.
        unmatched: well-formed annotations whose ``image_id`` is not among the images.
        examples: a description of the first few skipped or unmatched annotations.
        first_malformed: the description of the first malformed annotation ("" if none): the
            error raised when skipping is not asked for.
        outside_root: images whose ``file_name`` points outside the image folder.
        outside_examples: ``image id <id>: '<file_name>'`` of the first few of them.
    """

    skipped: Counter = field(default_factory=Counter)
    unmatched: int = 0
    examples: List[str] = field(default_factory=list)
    first_malformed: str = ""
    outside_root: int = 0
    outside_examples: List[str] = field(default_factory=list)


@dataclass
class CheckedCocoJson(CocoProblems):
    """A COCO json's content after :func:`check_coco_json`, and its :class:`CocoProblems`.

    Attributes:
        images: the ``images`` entries, as in the file.
        categories: the ``categories`` entries, as in the file.
        annotations: the well-formed annotations whose image is among ``images``.
    """

    images: List[Dict] = field(default_factory=list)
    categories: List[Dict] = field(default_factory=list)
    annotations: List[Dict] = field(default_factory=list)


def file_and_dataset(json_file: str, dataset_name: Optional[str]) -> str:
    """``"<file> (dataset '<name>')"``, how the messages name a file."""
    return f"{json_file} (dataset '{dataset_name}')" if dataset_name else json_file


def _is_int(value: Any) -> bool:
    # type() first: the abstract-class check costs microseconds, times millions of boxes.
    return type(value) is int or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
    )


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool)
    )


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


def entries_of(content: Dict, key: str, where: str, *, required: bool) -> List:
    """``content[key]``, a list (``[]`` when absent or null and not ``required``), or raises."""
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


def points_outside_root(file_name: str) -> bool:
    """Whether an image's ``file_name`` leaves the image folder: absolute, or ``..`` first.

    Decided on the path alone (symbolic links inside the folder are the user's business), so
    the answer does not depend on where the image folder is.
    """
    normalized = os.path.normpath(file_name)
    return (
        os.path.isabs(file_name)
        or normalized == os.pardir
        or normalized.startswith(os.pardir + os.sep)
    )


def check_image(image: Any, index: int, ids: set, where: str) -> bool:
    """Checks ``images[index]`` and adds its id to ``ids``.

    Returns:
        whether its ``file_name`` points outside the image folder (:func:`points_outside_root`).

    Raises:
        CocoFormatError: a malformed entry or a repeated id, naming the file and the image.
    """
    if not isinstance(image, dict):
        raise CocoFormatError(f"{where}: images[{index}] is {_shown(image)}; expected an object")
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
            "expected a string (the path relative to the image folder)"
        )
    for key in ("width", "height"):
        if not (_is_number(image.get(key)) and image[key] > 0):
            raise CocoFormatError(
                f"{where}: {name} has '{key}' {_shown(image.get(key, _MISSING))}; expected a "
                "positive number of pixels"
            )
    ids.add(image["id"])
    return points_outside_root(image["file_name"])


def check_categories(categories: List, where: str) -> set:
    """Checks the ``categories`` entries; returns their ids."""
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
    if annotation.get("segmentation") is not None:
        expected = segmentation_problem(annotation["segmentation"])
        if expected is not None:
            return "segmentation", annotation["segmentation"], expected
    return None


class AnnotationChecker:
    """Checks annotations one at a time, in file order; the json path and the cache share it.

    Args:
        where: the file (and dataset) named in the messages.
        category_ids: the ids of the json's categories.
        image_ids: the ids of the json's images (any object with ``in``).
        problems: where skipped and unmatched annotations are counted.
        skip_bad_annotations: count malformed annotations instead of raising.
        seen_ids: the ids of the annotations accepted so far (to find repeated ids); any object
            with ``in`` and ``add``.
    """

    def __init__(
        self,
        where: str,
        category_ids: set,
        image_ids,
        problems: CocoProblems,
        *,
        skip_bad_annotations: bool,
        seen_ids=None,
    ):
        self.where = where
        self.category_ids = category_ids
        self.image_ids = image_ids
        self.problems = problems
        self.skip_bad_annotations = skip_bad_annotations
        self.seen_ids = set() if seen_ids is None else seen_ids

    def __call__(self, annotation: Any, index: int) -> bool:
        """Checks ``annotations[index]``.

        Returns:
            True when it is kept: well-formed, with its image among the images.

        Raises:
            CocoFormatError: a malformed annotation, unless skipping.
        """
        problems = self.problems
        problem = _annotation_problem(annotation, self.category_ids, self.seen_ids)
        if problem is not None:
            key, value, expected = problem
            name = f"annotations[{index}]"
            if isinstance(annotation, dict) and _is_int(annotation.get("id")):
                name = f"annotation id {annotation['id']} ({name})"
            description = f"{name}: '{key}' is {_shown(value)}; expected {expected}"
            if not self.skip_bad_annotations:
                raise malformed_annotation_error(self.where, description)
            problems.first_malformed = problems.first_malformed or description
            problems.skipped[key] += 1
            if len(problems.examples) < _EXAMPLES:
                problems.examples.append(description)
            return False
        self.seen_ids.add(annotation["id"])
        if annotation["image_id"] not in self.image_ids:
            problems.unmatched += 1
            if len(problems.examples) < _EXAMPLES:
                problems.examples.append(
                    f"annotation id {annotation['id']}: image_id {annotation['image_id']} is "
                    "not among the images"
                )
            return False
        return True


def malformed_annotation_error(where: str, description: str) -> CocoFormatError:
    """The error for a malformed annotation described as ``"annotation id 3 (...): ..."``."""
    return CocoFormatError(
        f"{where}: {description}. Fix the file, or set {SKIP_OPTION} to skip "
        "malformed annotations (with one warning counting them)."
    )


def note_outside_root(problems: CocoProblems, image: Dict) -> None:
    """Counts an image whose ``file_name`` points outside the image folder."""
    problems.outside_root += 1
    if len(problems.outside_examples) < _EXAMPLES:
        problems.outside_examples.append(f"image id {image['id']}: {image['file_name']!r}")


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
    where = file_and_dataset(json_file, dataset_name)
    images = entries_of(content, "images", where, required=True)
    categories = entries_of(content, "categories", where, required=True)
    annotations = entries_of(content, "annotations", where, required=False)
    result = CheckedCocoJson(images=images, categories=categories)
    image_ids = set()
    for index, image in enumerate(images):
        if check_image(image, index, image_ids, where):
            note_outside_root(result, image)
    check = AnnotationChecker(
        where,
        check_categories(categories, where),
        image_ids,
        result,
        skip_bad_annotations=skip_bad_annotations,
    )
    result.annotations = [a for index, a in enumerate(annotations) if check(a, index)]
    return result


def check_images_inside_root(
    problems: CocoProblems, json_file: str, dataset_name: str, image_root: str, *, allow: bool
) -> None:
    """Refuses images whose ``file_name`` points outside ``image_root`` unless ``allow``.

    A COCO json is untrusted data: ``../../x.jpg`` or ``/etc/x.jpg`` would make the data
    loader read files outside the dataset.

    Raises:
        CocoFormatError: naming the file, the first such image and path, and the option.
    """
    if problems.outside_root and not allow:
        count = _plural(problems.outside_root, "image")
        raise CocoFormatError(
            f"{file_and_dataset(json_file, dataset_name)}: {problems.outside_examples[0]} points "
            f"outside the image folder {image_root} ({count} in all). Fix the file, or set "
            f"{OUTSIDE_ROOT_OPTION} to read such paths as given."
        )


def log_coco_problems(problems: CocoProblems, json_file: str, dataset_name: str) -> None:
    """Logs one warning for the skipped and the unmatched annotations of a checked json, and
    one for its images outside the image folder (registration allowed them)."""
    where = file_and_dataset(json_file, dataset_name)
    parts = []
    if problems.skipped:
        total = sum(problems.skipped.values())
        kinds = ", ".join(f"{n} with a bad '{k}'" for k, n in sorted(problems.skipped.items()))
        parts.append(f"{_plural(total, 'malformed annotation')} skipped ({kinds})")
    if problems.unmatched:
        parts.append(
            f"{_plural(problems.unmatched, 'annotation')} dropped: the image_id is not among the "
            "images"
        )
    if parts:
        logger.warning(
            f"{where}: " + "; ".join(parts) + ". For example: " + "; ".join(problems.examples) + "."
        )
    if problems.outside_root:
        logger.warning(
            f"{where}: {_plural(problems.outside_root, 'image')} outside the image folder, read "
            f"as given ({OUTSIDE_ROOT_OPTION}): " + "; ".join(problems.outside_examples)
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
        one dict per image, sorted by image id, with ``annotations`` (boxes in absolute XYWH,
        and segmentations where usable).
    """
    by_image = defaultdict(list)
    for annotation in checked.annotations:
        obj = {"bbox": annotation["bbox"], "bbox_mode": BoxMode.XYWH_ABS}
        obj["category_id"] = id_map[annotation["category_id"]]
        if "iscrowd" in annotation:
            obj["iscrowd"] = annotation["iscrowd"]
        segmentation = annotation.get("segmentation")
        if segmentation is not None:
            segmentation = usable_segmentation(segmentation)
        if segmentation is not None:
            obj["segmentation"] = segmentation
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
