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

A COCO-format dataset is read through a memory-mapped cache by default (``cache=True``, see
:mod:`dino_d2.data.coco_cache`): the json is converted once, streamed, and the data loaders read
records by index (:func:`get_detection_dataset`), so a dataset of any size costs a process
little memory; ``DatasetCatalog.get(name)`` still gives the list of dicts. ``cache=False`` reads
the json whole with Python's json, as before. Both paths check the same things with the same
messages, and refuse an image whose ``file_name`` points outside the image folder unless
``allow_images_outside_root=True`` (then one warning counts them).
"""

import functools
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch.utils.data import ConcatDataset, Dataset

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import check_metadata_consistency

from .cached_dataset import CachedCocoDataset
from .coco_cache import ensure_cache, problems_of, raise_problems, read_meta
from .coco_json import (
    check_coco_json,
    check_images_inside_root,
    coco_to_dataset_dicts,
    log_coco_problems,
)
from .coco_reader import read_coco_json
from .degenerate import forget_reported, log_degenerate_boxes, log_degenerate_counts
from .digits import DIGIT_CLASSES

__all__ = [
    "default_datasets_root",
    "register_digits",
    "register_coco_format_dataset",
    "load_coco_format_json",
    "load_cached_coco",
    "log_degenerate_boxes",
    "get_detection_dataset",
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
    cache: Optional[str] = None,
    allow_images_outside_root: bool = False,
) -> None:
    """Registers ``name`` unless it is registered with these files already (see module doc).

    ``cache`` is the folder of the json's cache (read by :func:`load_cached_coco`), or None to
    read the json itself (:func:`load_coco_format_json`).
    """
    metadata = dict(
        metadata,
        coco_json_file=json_file,
        image_root=image_root,
        skip_bad_annotations=skip_bad_annotations,
        allow_images_outside_root=allow_images_outside_root,
        coco_cache=cache,
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
    forget_reported(name)
    if cache is not None:
        DatasetCatalog.register(name, functools.partial(load_cached_coco, name))
    else:
        DatasetCatalog.register(
            name,
            functools.partial(
                load_coco_format_json,
                json_file,
                image_root,
                name,
                skip_bad_annotations=skip_bad_annotations,
                allow_images_outside_root=allow_images_outside_root,
            ),
        )
    MetadataCatalog.get(name).set(**metadata)


def load_coco_format_json(
    json_file: str,
    image_root: str,
    name: str,
    *,
    skip_bad_annotations: bool = False,
    allow_images_outside_root: bool = False,
) -> List[Dict]:
    """Loads a COCO instances json as Detectron2 dataset dicts (boxes only), checked.

    The first load of ``name`` in a process logs the skipped and dropped annotations, the
    images outside the image folder and the degenerate boxes (:func:`log_degenerate_boxes`).

    Args:
        json_file: the COCO json.
        image_root: the folder its ``file_name`` entries are relative to.
        name: the dataset name, for the messages.
        skip_bad_annotations: skip malformed annotations instead of raising.
        allow_images_outside_root: read a ``file_name`` that points outside ``image_root`` as
            given instead of raising.

    Returns:
        the dataset dicts (see :func:`dino_d2.data.coco_json.coco_to_dataset_dicts`).

    Raises:
        dino_d2.data.coco_json.CocoFormatError: a malformed file (see that module).
    """
    checked = check_coco_json(
        read_coco_json(json_file, name), json_file, name, skip_bad_annotations=skip_bad_annotations
    )
    check_images_inside_root(checked, json_file, name, image_root, allow=allow_images_outside_root)
    if name not in _REPORTED:
        log_coco_problems(checked, json_file, name)
        _REPORTED.add(name)
    id_map = _category_metadata(checked.categories)["thing_dataset_id_to_contiguous_id"]
    dicts = coco_to_dataset_dicts(checked, image_root, id_map)
    logger.info(f"Loaded {len(dicts)} images in COCO format from {json_file}")
    return log_degenerate_boxes(dicts, name)


def _report_cached(name: str) -> None:
    """Logs a cached dataset's problems and degenerate boxes, once per name and process."""
    if name in _REPORTED:
        return
    metadata = MetadataCatalog.get(name)
    meta = read_meta(metadata.coco_cache)
    log_coco_problems(problems_of(meta), metadata.coco_json_file, name)
    log_degenerate_counts(meta["degenerate"], name)
    _REPORTED.add(name)


def load_cached_coco(name: str) -> List[Dict]:
    """All the dataset dicts of a dataset registered with the cache, as a list (the same as
    :func:`load_coco_format_json` gives, with float32 box values)."""
    _report_cached(name)
    metadata = MetadataCatalog.get(name)
    dicts = list(CachedCocoDataset(metadata.coco_cache, metadata.image_root))
    logger.info(f"Loaded {len(dicts)} images in COCO format from {metadata.coco_cache}")
    return dicts


def get_detection_dataset(
    names: Union[str, Sequence[str]], filter_empty: bool = True, **kwargs
) -> Union[Dataset, List[Dict]]:
    """The datasets ``names`` for a data loader; what dino_d2's configs use instead of
    Detectron2's ``get_detection_dataset_dicts``, which on v0.6 always builds a list.

    Args:
        names: registered dataset names.
        filter_empty: drop the images without a box that is not a crowd.
        kwargs: Detectron2's ``get_detection_dataset_dicts`` arguments (list path only).

    Returns:
        a :class:`~dino_d2.data.cached_dataset.CachedCocoDataset` (a ``ConcatDataset`` of them
        for several names) when every dataset was registered with the cache and no ``kwargs``
        are given, else Detectron2's list of dataset dicts.
    """
    names = [names] if isinstance(names, str) else list(names)
    cached = [MetadataCatalog.get(name).get("coco_cache") for name in names]
    if not names or not all(cached) or kwargs:
        return get_detection_dataset_dicts(names, filter_empty=filter_empty, **kwargs)
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    datasets = []
    for name, folder in zip(names, cached):
        _report_cached(name)
        dataset = CachedCocoDataset(
            folder, MetadataCatalog.get(name).image_root, filter_empty=filter_empty
        )
        if filter_empty:
            removed = read_meta(folder)["num_images"] - len(dataset)
            logger.info(
                f"Removed {removed} images with no usable annotations from '{name}'. "
                f"{len(dataset)} images left."
            )
        datasets.append(dataset)
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


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
    name: str,
    json_file: str,
    image_root: str,
    *,
    skip_bad_annotations: bool = False,
    cache: bool = True,
    allow_images_outside_root: bool = False,
) -> int:
    """Registers a dataset in COCO instances format under ``name``.

    Args:
        name: the dataset name for ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: the COCO json (``images``, ``annotations``, ``categories``); it is read and
            checked once here (and, with ``cache``, converted once per content).
        image_root: the folder the json's ``file_name`` entries are relative to.
        skip_bad_annotations: skip malformed annotations (with one warning when the dataset is
            loaded) instead of raising; see the module docstring for the evaluation.
        cache: read the json through its memory-mapped cache (:mod:`dino_d2.data.coco_cache`)
            instead of whole with Python's json.
        allow_images_outside_root: read a ``file_name`` that points outside ``image_root``
            (absolute, or starting with ``..``) as given, with one warning, instead of raising.

    Returns:
        the number of classes, i.e. of entries in the json's ``categories``.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: the json has no ``categories``.
        dino_d2.data.coco_json.CocoFormatError: the file is not valid JSON, has a malformed
            entry (see :mod:`dino_d2.data.coco_json`), or an image outside ``image_root``.
    """
    json_file = os.path.abspath(os.fspath(json_file))
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file for dataset '{name}' not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder for dataset '{name}' not found: {image_root}")
    folder = None
    if cache:
        folder = ensure_cache(json_file, name)
        meta = read_meta(folder)
        categories, problems = meta["categories"], problems_of(meta)
    else:
        content = read_coco_json(json_file, name)
        categories = content.get("categories")
    if not categories:
        raise ValueError(f"{json_file} has no 'categories'; a COCO instances json needs them")
    if cache:
        raise_problems(meta, json_file, name, skip=skip_bad_annotations)
    else:
        problems = check_coco_json(
            content, json_file, name, skip_bad_annotations=skip_bad_annotations
        )
        categories = problems.categories
    check_images_inside_root(problems, json_file, name, image_root, allow=allow_images_outside_root)
    _register(
        name,
        json_file,
        image_root,
        _category_metadata(categories),
        skip_bad_annotations=skip_bad_annotations,
        evaluate_from_json=not problems.skipped,
        cache=folder,
        allow_images_outside_root=allow_images_outside_root,
    )
    return len(categories)
