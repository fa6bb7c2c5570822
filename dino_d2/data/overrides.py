"""The datasets of a job given on the command line, and checks of the config's datasets.

:func:`pop_dataset_overrides` and :func:`apply_dataset_overrides` let a job train on any
COCO-format dataset without writing Python::

    tools/lazyconfig_train_net.py --config-file configs/dino_r18_digits.py \\
        dataset.train_json=train.json dataset.train_images=train/ \\
        dataset.test_json=val.json dataset.test_images=val/

registers the two datasets as ``custom_train`` and ``custom_test``, points the config's data
loaders (and so the evaluator) at them and sets ``model.num_classes`` from the json's categories.
``dataset.skip_bad_annotations=True`` skips their malformed annotations with one warning instead
of stopping (see :mod:`dino_d2.data.coco_json`). The jsons are read through their memory-mapped
cache (:mod:`dino_d2.data.coco_cache`, converted once, so any size fits in memory);
``dataset.cache=False`` reads them whole with Python's json instead.
``dataset.allow_images_outside_root=True`` reads image paths that leave the image folder
(``../x.jpg``, absolute) as given, with one warning, instead of stopping.

:func:`register_config_datasets` registers the builtin datasets (the digits, Objects365) the
config's data loaders name, and :func:`check_num_classes` checks ``model.num_classes`` against
their categories.
"""

import logging
from typing import Dict, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from .builtin import register_builtin_datasets
from .datasets import register_coco_format_dataset

__all__ = [
    "DATASET_OVERRIDE_KEYS",
    "CUSTOM_TRAIN_DATASET",
    "CUSTOM_TEST_DATASET",
    "pop_dataset_overrides",
    "apply_dataset_overrides",
    "config_dataset_names",
    "register_config_datasets",
    "check_num_classes",
]

DATASET_OVERRIDE_KEYS = (
    "train_json",
    "train_images",
    "test_json",
    "test_images",
    "skip_bad_annotations",
    "cache",
    "allow_images_outside_root",
)
_BOOLEAN_DATASET_KEYS = {"skip_bad_annotations", "cache", "allow_images_outside_root"}
_BOOLEANS = {"true": True, "false": False}
CUSTOM_TRAIN_DATASET = "custom_train"
CUSTOM_TEST_DATASET = "custom_test"


def pop_dataset_overrides(opts: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Separates the ``dataset.<key>=<value>`` command-line overrides from the config overrides.

    Args:
        opts: the ``key=value`` overrides of the command line.

    Returns:
        the other overrides (for ``LazyConfig.apply_overrides``), and ``{key: value}`` of the
        dataset ones (bools for ``skip_bad_annotations``, ``cache`` and
        ``allow_images_outside_root``, strings for the paths).

    Raises:
        ValueError: a ``dataset.*`` key other than :data:`DATASET_OVERRIDE_KEYS`, a repeated
            one, one without a value, or a ``skip_bad_annotations`` that is not true or false.
    """
    remaining, datasets = [], {}
    for opt in opts or ():
        key, sep, value = opt.partition("=")
        if not key.startswith("dataset."):
            remaining.append(opt)
            continue
        name = key[len("dataset.") :]
        if name not in DATASET_OVERRIDE_KEYS:
            raise ValueError(
                f"unknown dataset override '{key}'; valid: "
                + ", ".join(f"dataset.{k}" for k in DATASET_OVERRIDE_KEYS)
            )
        if name in _BOOLEAN_DATASET_KEYS:
            if value.lower() not in _BOOLEANS:
                raise ValueError(f"'{key}' takes True or False, got {opt!r}")
            value = _BOOLEANS[value.lower()]
        elif not sep or not value:
            raise ValueError(f"'{key}' needs a value: {key}=<path>")
        if name in datasets:
            raise ValueError(f"'{key}' is given twice")
        datasets[name] = value
    return remaining, datasets


def _category_signature(name: str):
    metadata = MetadataCatalog.get(name)
    return list(metadata.thing_classes), dict(metadata.thing_dataset_id_to_contiguous_id)


def apply_dataset_overrides(cfg: DictConfig, overrides: Dict[str, str]) -> None:
    """Registers the COCO-format datasets named by :func:`pop_dataset_overrides` and uses them.

    ``train_json`` + ``train_images`` register :data:`CUSTOM_TRAIN_DATASET` and set
    ``dataloader.train.dataset.names``; ``test_json`` + ``test_images`` register
    :data:`CUSTOM_TEST_DATASET` and set ``dataloader.test.dataset.names`` (the evaluator follows
    it in dino_d2's configs). ``model.num_classes`` is set to the number of categories.
    ``skip_bad_annotations``, ``cache`` and ``allow_images_outside_root`` are passed on to
    :func:`register_coco_format_dataset`. Call it in every process (registrations are per
    process); the processes of a machine take turns to build a json's cache (a file lock), so
    it is converted once.

    Raises:
        ValueError: a json without its image folder (or the reverse), a boolean option without
            a json, or train and test jsons whose categories (ids and names) differ.
    """
    overrides = dict(overrides)
    options = {
        k: overrides.pop(k, None) for k in DATASET_OVERRIDE_KEYS if k in _BOOLEAN_DATASET_KEYS
    }
    options = {k: v for k, v in options.items() if v is not None}
    if not overrides:
        if options:
            raise ValueError(
                f"dataset.{next(iter(options))} applies to the datasets of dataset.train_json "
                "and dataset.test_json; give them too"
            )
        return
    logger = logging.getLogger(__name__)
    splits = {}
    for split, dataset_name in (("train", CUSTOM_TRAIN_DATASET), ("test", CUSTOM_TEST_DATASET)):
        json_file = overrides.get(f"{split}_json")
        image_root = overrides.get(f"{split}_images")
        if (json_file is None) != (image_root is None):
            raise ValueError(f"dataset.{split}_json and dataset.{split}_images go together")
        if json_file is None:
            continue
        num_classes = register_coco_format_dataset(dataset_name, json_file, image_root, **options)
        OmegaConf.update(cfg, f"dataloader.{split}.dataset.names", dataset_name, merge=False)
        splits[split] = (dataset_name, num_classes)
    if "train" in splits and "test" in splits:
        train_categories = _category_signature(splits["train"][0])
        test_categories = _category_signature(splits["test"][0])
        if train_categories != test_categories:
            raise ValueError(
                f"the categories of dataset.train_json ({train_categories[0]}) and "
                f"dataset.test_json ({test_categories[0]}) differ; they must have the same "
                "category ids and names"
            )
    elif "train" in splits:
        logger.warning(
            "dataset.train_json given without dataset.test_json: evaluating on "
            f"{OmegaConf.select(cfg, 'dataloader.test.dataset.names')}"
        )
    num_classes = next(iter(splits.values()))[1]
    if cfg.model.get("num_classes") != num_classes:
        logger.info(f"model.num_classes set to {num_classes} (the datasets' categories)")
    cfg.model.num_classes = num_classes


def config_dataset_names(cfg: DictConfig) -> List[str]:
    """The dataset names of ``dataloader.train.dataset.names`` and ``dataloader.test...``."""
    names = []
    for key in ("dataloader.train.dataset.names", "dataloader.test.dataset.names"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        names.extend([value] if isinstance(value, str) else list(value))
    return names


def register_config_datasets(cfg: DictConfig) -> List[str]:
    """Registers the builtin datasets (e.g. digits) the config's data loaders use.

    In a distributed job the first process of each machine registers (and possibly generates)
    them first, then the others: generating a dataset happens once per machine.

    Returns:
        the names registered by this call.
    """
    names = config_dataset_names(cfg)
    if comm.get_world_size() == 1:
        return register_builtin_datasets(names)
    registered = register_builtin_datasets(names) if comm.get_local_rank() == 0 else []
    comm.synchronize()
    if comm.get_local_rank() != 0:
        registered = register_builtin_datasets(names)
    return registered


def check_num_classes(cfg: DictConfig) -> None:
    """Checks ``model.num_classes`` against the categories of the config's datasets.

    Detectron2 maps each dataset's category ids, contiguous or not, to ``0..K-1``
    (``thing_dataset_id_to_contiguous_id``), so the model needs exactly ``K`` classes. Datasets
    whose metadata has no ``thing_classes`` are not checked.

    Raises:
        ValueError: naming the dataset, both numbers and the override that fixes it.
    """
    num_classes = cfg.model.get("num_classes")
    if num_classes is None:
        return
    for name in config_dataset_names(cfg):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None or len(classes) == num_classes:
            continue
        shown = list(classes[:10]) + (["..."] if len(classes) > 10 else [])
        raise ValueError(
            f"model.num_classes={num_classes} but dataset '{name}' has {len(classes)} categories "
            f"({shown}; Detectron2 maps their ids to 0..{len(classes) - 1}, contiguous or not). "
            f"Set model.num_classes={len(classes)} on the command line or in the config."
        )
