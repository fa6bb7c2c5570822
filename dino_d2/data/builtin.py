"""Datasets that dino_d2 registers on demand, by name, the way Detectron2 has builtin datasets.

Detectron2 registers its builtin datasets (COCO, LVIS, ...) when ``detectron2.data`` is imported;
their files must already be under ``$DETECTRON2_DATASETS``. dino_d2's builtin datasets are
registered when something asks for them (the training script asks for the dataset names its
config uses), which also lets a registration function create its files: the digits dataset is
generated on first use.

A registration function takes the datasets root folder and registers one or more names. Add a
dataset with :func:`register_builtin`.
"""

import logging
import os
from typing import Callable, Dict, Iterable, List, Optional

from detectron2.data import DatasetCatalog

from .datasets import default_datasets_root, register_digits
from .digits import ensure_digits_dataset

__all__ = ["register_builtin", "builtin_dataset_names", "register_builtin_datasets"]

logger = logging.getLogger(__name__)

_BUILTIN: Dict[str, Callable[[str], object]] = {}


def register_builtin(names: Iterable[str], register: Callable[[str], object]) -> None:
    """Declares builtin datasets.

    Args:
        names: the dataset names ``register`` provides.
        register: called with the datasets root folder; must register every one of ``names``
            in Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.
    """
    for name in names:
        _BUILTIN[name] = register


def builtin_dataset_names() -> List[str]:
    """The names :func:`register_builtin_datasets` knows."""
    return sorted(_BUILTIN)


def register_builtin_datasets(names: Iterable[str], root: Optional[str] = None) -> List[str]:
    """Registers those of ``names`` that are builtin and not registered yet.

    Other names (already registered, Detectron2's own, or unknown) are left alone: Detectron2
    reports unknown names when the dataset is loaded.

    Args:
        names: dataset names, e.g. the config's ``dataloader.train.dataset.names``.
        root: the datasets root folder; default ``$DETECTRON2_DATASETS``, else ``datasets``.

    Returns:
        those of ``names`` that this call registered.
    """
    root = default_datasets_root() if root is None else root
    names = list(dict.fromkeys(names))
    before = set(DatasetCatalog.list())
    for name in names:
        if name in _BUILTIN and name not in DatasetCatalog.list():
            _BUILTIN[name](root)
            if name not in DatasetCatalog.list():
                raise RuntimeError(f"the builtin registration of '{name}' did not register it")
    return [name for name in names if name not in before and name in DatasetCatalog.list()]


def _register_builtin_digits(root: str) -> None:
    """The digits dataset with its default parameters at ``root/digits`` (generated if missing)."""
    folder = os.path.join(root, "digits")
    ensure_digits_dataset(folder)
    register_digits(folder, names=("digits_train", "digits_val"))
    logger.info(f"Registered digits_train and digits_val from {os.path.abspath(folder)}")


register_builtin(("digits_train", "digits_val"), _register_builtin_digits)
