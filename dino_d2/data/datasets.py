"""Registration of the digits demo dataset and of any COCO-format dataset with Detectron2.

Both are registered as Detectron2's ``register_coco_instances`` registers: the metadata carries
``json_file``, ``image_root`` and ``evaluator_type="coco"`` and ``COCOEvaluator`` works unchanged;
``DatasetCatalog.get(name)`` returns Detectron2 dataset dicts with contiguous category ids
``0..K-1`` (the json's category ids in increasing order). ``thing_classes`` and
``thing_dataset_id_to_contiguous_id`` are set at registration time, with the values
``load_coco_json`` computes when the dataset is loaded, so they are available before that.

The json is read by :mod:`dino_d2.data.coco_json` instead of Detectron2's ``load_coco_json``
(the same dataset dicts for boxes), so that a malformed file or annotation is reported with the
file, the dataset, the annotation id and the field. :func:`register_coco_format_dataset` checks
the file when it registers it, so a job stops at start-up rather than when the data loaders are
built. With ``skip_bad_annotations=True`` malformed annotations are skipped instead; the
metadata then has no ``json_file``, so that ``COCOEvaluator`` evaluates against the annotations
that were kept (Detectron2 converts them to a COCO json in the evaluator's output folder) rather
than reading the malformed file. ``coco_json_file`` always names the file.

Registration is idempotent: registering a name again with the same files does nothing, and with
other files replaces the earlier registration (with a warning).

Loading a dataset registered here logs, once per dataset and process, the annotations skipped or
dropped (an ``image_id`` that is not among the images) and the degenerate boxes (see
:func:`log_degenerate_boxes`); the DatasetMapper then clips or drops those boxes.
"""

import logging
import math
import os
from collections import Counter
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_json import check_coco_json, coco_to_dataset_dicts, log_coco_problems, read_coco_json
from .digits import DIGIT_CLASSES

__all__ = [
    "default_datasets_root",
    "register_digits",
    "register_coco_format_dataset",
    "load_coco_format_json",
    "log_degenerate_boxes",
]

logger = logging.getLogger(__name__)

_REPORTED = set()

_DIGITS_SPLITS = ("train", "val")


def default_datasets_root() -> str:
    """Detectron2's dataset folder: ``$DETECTRON2_DATASETS``, or ``"datasets"`` when unset."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def _register(
    name: str,
    json_file: str,
    image_root: str,
    metadata: Dict,
    *,
    skip_bad_annotations: bool = False,
    evaluate_from_json: bool = True,
) -> None:
    """Registers ``name`` unless it is registered with these files already (see module doc)."""
    metadata = dict(
        metadata,
        coco_json_file=json_file,
        image_root=image_root,
        skip_bad_annotations=skip_bad_annotations,
        evaluator_type="coco",
    )
    if evaluate_from_json:
        metadata["json_file"] = json_file
    if name in DatasetCatalog.list():
        previous = MetadataCatalog.get(name)
        same = all(previous.get(k) == v for k, v in metadata.items())
        if same and previous.get("json_file") == metadata.get("json_file"):
            return
        logger.warning(
            f"Dataset '{name}' was registered with json_file="
            f"{previous.get('coco_json_file', previous.get('json_file'))}, "
            f"image_root={previous.get('image_root')}; replacing it with {json_file}, {image_root}"
        )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    _REPORTED.discard(name)
    DatasetCatalog.register(
        name,
        lambda: load_coco_format_json(
            json_file, image_root, name, skip_bad_annotations=skip_bad_annotations
        ),
    )
    MetadataCatalog.get(name).set(**metadata)


def load_coco_format_json(
    json_file: str, image_root: str, name: str, *, skip_bad_annotations: bool = False
) -> List[Dict]:
    """Loads a COCO instances json as Detectron2 dataset dicts (boxes only), checked.

    The first load of ``name`` in a process logs the skipped and dropped annotations and the
    degenerate boxes (:func:`log_degenerate_boxes`).

    Args:
        json_file: the COCO json.
        image_root: the folder its ``file_name`` entries are relative to.
        name: the dataset name, for the messages.
        skip_bad_annotations: skip malformed annotations instead of raising.

    Returns:
        the dataset dicts (see :func:`dino_d2.data.coco_json.coco_to_dataset_dicts`).

    Raises:
        dino_d2.data.coco_json.CocoFormatError: a malformed file (see that module).
    """
    checked = check_coco_json(
        read_coco_json(json_file, name), json_file, name, skip_bad_annotations=skip_bad_annotations
    )
    if name not in _REPORTED:
        log_coco_problems(checked, json_file, name)
    id_map = _category_metadata(checked.categories)["thing_dataset_id_to_contiguous_id"]
    dicts = coco_to_dataset_dicts(checked, image_root, id_map)
    logger.info(f"Loaded {len(dicts)} images in COCO format from {json_file}")
    return log_degenerate_boxes(dicts, name)


def _box_problem(annotation: Dict, width: float, height: float) -> str:
    """Why an XYWH box is degenerate ("non-finite", "empty", ...), or "" when it is usable."""
    x, y, w, h = (float(v) for v in annotation["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "non-finite"
    if w <= 0 or h <= 0:
        return "empty"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "outside the image"
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return "partly outside the image (clipped)"
    return ""


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
    counts = Counter()
    for record in dataset_dicts:
        for annotation in record.get("annotations", ()):
            if "bbox" in annotation:
                counts[_box_problem(annotation, record["width"], record["height"])] += 1
    counts.pop("", None)
    if counts:
        summary = ", ".join(f"{n} {problem}" for problem, n in sorted(counts.items()))
        logger.warning(
            f"Dataset '{name}' has degenerate boxes: {summary}. The DatasetMapper clips boxes "
            "to the image and drops the empty ones."
        )
    _REPORTED.add(name)
    return dataset_dicts


def _category_metadata(categories: List[Dict]) -> Dict:
    """``thing_classes`` and the id map exactly as Detectron2's ``load_coco_json`` builds them."""
    categories = sorted(categories, key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def register_digits(
    root: str, names: Sequence[str] = ("digits_train", "digits_val")
) -> Tuple[str, ...]:
    """Registers the train and val splits of the digits dataset at ``root``.

    The files need not exist yet (like Detectron2's builtin datasets): create them first with
    :func:`dino_d2.data.digits.ensure_digits_dataset`. The metadata has
    ``thing_classes = ["0", ..., "9"]``: contiguous id ``d`` is the digit ``d``.

    Args:
        root: the digits dataset folder (``root/annotations/{train,val}.json``,
            ``root/{train,val}/``).
        names: the dataset names of the train and the val split.

    Returns:
        the registered names.
    """
    names = tuple(names)
    if len(names) != len(_DIGITS_SPLITS):
        raise ValueError(f"register_digits needs one name per split {_DIGITS_SPLITS}, got {names}")
    root = os.path.abspath(os.fspath(root))
    categories = [{"id": d + 1, "name": c} for d, c in enumerate(DIGIT_CLASSES)]
    metadata = _category_metadata(categories)
    for name, split in zip(names, _DIGITS_SPLITS):
        json_file = os.path.join(root, "annotations", f"{split}.json")
        _register(name, json_file, os.path.join(root, split), metadata)
    return names


def register_coco_format_dataset(
    name: str, json_file: str, image_root: str, *, skip_bad_annotations: bool = False
) -> int:
    """Registers a dataset in COCO instances format under ``name``.

    Args:
        name: the dataset name for ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: the COCO json (``images``, ``annotations``, ``categories``); it is read and
            checked once here (a few seconds for a COCO-sized file).
        image_root: the folder the json's ``file_name`` entries are relative to.
        skip_bad_annotations: skip malformed annotations (with one warning when the dataset is
            loaded) instead of raising; see the module docstring for the evaluation.

    Returns:
        the number of classes, i.e. of entries in the json's ``categories``.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: the json has no ``categories``.
        dino_d2.data.coco_json.CocoFormatError: the file is not valid JSON, or has a malformed
            entry (see :mod:`dino_d2.data.coco_json`).
    """
    json_file = os.path.abspath(os.fspath(json_file))
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file for dataset '{name}' not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder for dataset '{name}' not found: {image_root}")
    content = read_coco_json(json_file, name)
    if not content.get("categories"):
        raise ValueError(f"{json_file} has no 'categories'; a COCO instances json needs them")
    checked = check_coco_json(content, json_file, name, skip_bad_annotations=skip_bad_annotations)
    _register(
        name,
        json_file,
        image_root,
        _category_metadata(checked.categories),
        skip_bad_annotations=skip_bad_annotations,
        evaluate_from_json=not checked.skipped,
    )
    return len(checked.categories)
