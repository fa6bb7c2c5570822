"""Registration of the digits demo dataset and of any COCO-format dataset with Detectron2.

Both go through Detectron2's ``register_coco_instances``, so the registered metadata carries
``json_file``, ``image_root`` and ``evaluator_type="coco"`` and ``COCOEvaluator`` works unchanged;
``DatasetCatalog.get(name)`` returns Detectron2 dataset dicts with contiguous category ids
``0..K-1`` (the json's category ids in increasing order). ``thing_classes`` and
``thing_dataset_id_to_contiguous_id`` are set at registration time, with the values
``load_coco_json`` computes when the dataset is loaded, so they are available before that.

Registration is idempotent: registering a name again with the same files does nothing, and with
other files replaces the earlier registration (with a warning).
"""

import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .digits import DIGIT_CLASSES

__all__ = ["default_datasets_root", "register_digits", "register_coco_format_dataset"]

logger = logging.getLogger(__name__)

_DIGITS_SPLITS = ("train", "val")


def default_datasets_root() -> str:
    """Detectron2's dataset folder: ``$DETECTRON2_DATASETS``, or ``"datasets"`` when unset."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def _register(name: str, json_file: str, image_root: str, metadata: Dict) -> None:
    """Registers ``name`` unless it is registered with these files already (see module doc)."""
    if name in DatasetCatalog.list():
        previous = MetadataCatalog.get(name)
        same_files = (
            previous.get("json_file") == json_file and previous.get("image_root") == image_root
        )
        if same_files and all(previous.get(k) == v for k, v in metadata.items()):
            return
        logger.warning(
            f"Dataset '{name}' was registered with json_file={previous.get('json_file')}, "
            f"image_root={previous.get('image_root')}; replacing it with {json_file}, {image_root}"
        )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, metadata, json_file, image_root)


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


def register_coco_format_dataset(name: str, json_file: str, image_root: str) -> int:
    """Registers a dataset in COCO instances format under ``name``.

    Args:
        name: the dataset name for ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: the COCO json (``images``, ``annotations``, ``categories``); it is read once
            here to get the categories (a few seconds for a COCO-sized file).
        image_root: the folder the json's ``file_name`` entries are relative to.

    Returns:
        the number of classes, i.e. of entries in the json's ``categories``.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: the json has no ``categories``.
    """
    json_file = os.path.abspath(os.fspath(json_file))
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file for dataset '{name}' not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder for dataset '{name}' not found: {image_root}")
    with open(json_file) as f:
        content = json.load(f)
    categories = content.get("categories") if isinstance(content, dict) else None
    if not categories:
        raise ValueError(f"{json_file} has no 'categories'; a COCO instances json needs them")
    _register(name, json_file, image_root, _category_metadata(categories))
    return len(categories)
