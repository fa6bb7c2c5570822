"""The start of a training or evaluation job: logging, config backup, seeding, devices, datasets.

:func:`default_setup` does what Detectron2's ``default_setup`` does (which fails on the PyPI
v0.6 wheel, see :mod:`dino_d2._compat`). The dataset helpers let a job train on any COCO-format
dataset from the command line, without writing Python::

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
"""

import functools
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .. import _compat
from ..data import register_builtin_datasets, register_coco_format_dataset
from .output_dir import check_writable, prepare_output_dir
from .train_keys import check_train_keys

__all__ = [
    "default_setup",
    "drop_log_files_on_error",
    "resolve_device",
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


def default_setup(cfg: DictConfig, args) -> None:
    """Sets up a job like Detectron2's ``default_setup``, for LazyConfigs.

    1. creates ``cfg.train.output_dir`` and checks that it is writable (main process), then logs
       the ``detectron2``, ``dino_d2`` and ``fvcore`` loggers to the console (main process) and
       to ``output_dir/log.txt`` (``.rankN`` for others; see :func:`drop_log_files_on_error`);
    2. logs the rank, the environment, the command line and the config file;
    3. checks that the folder does not hold another config's checkpoints (a warning, or an
       error with ``--resume``) and saves the config as ``output_dir/config.yaml``, atomically
       (main process; see :func:`dino_d2.engine.output_dir.prepare_output_dir`);
    4. warns about keys under ``train`` that nothing reads (:func:`check_train_keys`);
    5. seeds every random generator with ``train.seed + rank`` (a random seed when negative);
    6. sets ``torch.backends.cudnn.benchmark`` from ``train.cudnn_benchmark`` (default False)
       unless evaluating only.

    Args:
        cfg: the LazyConfig, with overrides applied.
        args: the parsed command line (``config_file``, ``resume`` and ``eval_only`` are read if
            present).

    Raises:
        dino_d2.utils.OutputWriteError: the output folder is not writable.
        dino_d2.engine.output_dir.OutputDirConflictError: ``--resume`` in a folder holding the
            checkpoints of another model or other training datasets.
    """
    output_dir = cfg.train.output_dir
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        check_writable(output_dir)
    loggers = [
        setup_logger(output_dir, distributed_rank=rank, name="fvcore"),
        setup_logger(output_dir, distributed_rank=rank, name="dino_d2", abbrev_name="dino_d2"),
        setup_logger(output_dir, distributed_rank=rank),
    ]
    drop_log_files_on_error(*loggers)
    logger = loggers[-1]

    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + _compat.collect_env_info())
    logger.info(f"Command line arguments: {args}")
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file) as f:
            logger.info(f"Contents of args.config_file={config_file}:\n{f.read()}")

    if comm.is_main_process() and output_dir:
        path = prepare_output_dir(cfg, resume=bool(getattr(args, "resume", False)))
        logger.info(f"Full config saved to {path}")
    check_train_keys(cfg.train)

    seed = cfg.train.get("seed", -1)
    seed_all_rng(None if seed < 0 else seed + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = bool(cfg.train.get("cudnn_benchmark", False))


def _drop_handler(logger: logging.Logger, handler: logging.Handler, record) -> None:
    error = sys.exc_info()[1]
    logger.removeHandler(handler)
    name = getattr(handler.stream, "name", "the log file")
    sys.stderr.write(
        f"dino_d2: {name} cannot be written ({error}); logger '{logger.name}' logs to the "
        "console only from here on\n"
    )


def drop_log_files_on_error(*loggers: logging.Logger) -> None:
    """Makes a log file that cannot be written (a full disk) leave its logger with one message.

    Python's logging prints a traceback for every line that fails to reach a file; with a full
    disk, those hide the error that stops the job. After this call a file handler of
    ``loggers`` whose write fails is removed, with one line on stderr; the console handlers
    go on.
    """
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is None or stream in (sys.stdout, sys.stderr):
                continue
            handler.handleError = functools.partial(_drop_handler, logger, handler)


def resolve_device(device: Optional[str]) -> str:
    """``train.device``: None means ``"cuda"`` when CUDA is available, else ``"cpu"``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


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
