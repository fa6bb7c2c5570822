"""Objects365 v1 and v2 as builtin datasets, registered on demand by name.

``objects365_v2_train``, ``objects365_v2_val``, ``objects365_v1_train`` and ``objects365_v1_val``
are registered (through :func:`dino_d2.data.register_coco_format_dataset`) when a config asks for
them, from these files under ``$DETECTRON2_DATASETS/objects365`` (``datasets/objects365`` when the
variable is unset)::

    objects365/v2/                               Objects365 2020 (v2), as the download site has it
        train/zhiyuan_objv2_train.json           from train/zhiyuan_objv2_train.tar.gz
        train/images/v1/patch0 .. patch15/       from train/patch{0..50}.tar.gz
        train/images/v2/patch16 .. patch50/
        val/zhiyuan_objv2_val.json
        val/images/v1/patch0 .. patch15/         from val/images/v1/patch{0..15}.tar.gz
        val/images/v2/patch16 .. patch43/        from val/images/v2/patch{16..43}.tar.gz
    objects365/v1/                               Objects365 2019 (v1), mmdetection's layout
        annotations/objects365_train.json
        annotations/objects365_val.json
        train/   val/                            the images

The v2 jsons name their images ``images/v1/patch8/objects365_v1_00420917.jpg``, relative to the
split folder, which is why the patches sit under ``images/v1`` and ``images/v2``. mmdetection's
docs extract the patches into ``train/patchN`` and ``val/patchN`` and keep the jsons in
``annotations/``; such a folder is used as it is after (in ``train`` and ``val``)
``mkdir images && ln -s .. images/v1 && ln -s .. images/v2`` and a link to the json.

The class names (``thing_classes``) are checked against the published lists of
:mod:`dino_d2.data.objects365_classes`: a json whose categories (in id order) differ is refused,
since the class map of a fine-tune (:mod:`dino_d2.data.objects365_coco_map`) relies on that order.
"""

import functools
import os
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .builtin import register_builtin
from .datasets import register_coco_format_dataset
from .objects365_classes import OBJECTS365_CLASSES

__all__ = [
    "OBJECTS365_DATASETS",
    "Objects365LayoutError",
    "objects365_files",
    "register_objects365",
]

# Dataset name -> (json file, image folder), relative to <datasets root>/objects365.
OBJECTS365_DATASETS: Dict[str, Tuple[str, str]] = {
    "objects365_v2_train": ("v2/train/zhiyuan_objv2_train.json", "v2/train"),
    "objects365_v2_val": ("v2/val/zhiyuan_objv2_val.json", "v2/val"),
    "objects365_v1_train": ("v1/annotations/objects365_train.json", "v1/train"),
    "objects365_v1_val": ("v1/annotations/objects365_val.json", "v1/val"),
}


class Objects365LayoutError(FileNotFoundError):
    """Files or folders of an Objects365 dataset are missing; the message lists what is
    expected and what was not found."""


def _version(name: str) -> str:
    return name.split("_")[1]


def objects365_files(name: str, root: str) -> Tuple[str, str]:
    """The json file and the image folder of the Objects365 dataset ``name`` under ``root``.

    Args:
        name: one of :data:`OBJECTS365_DATASETS`.
        root: the datasets root folder (``$DETECTRON2_DATASETS``).

    Returns:
        ``(json_file, image_root)``, absolute paths.
    """
    if name not in OBJECTS365_DATASETS:
        raise KeyError(
            f"{name!r} is not an Objects365 dataset; known: {sorted(OBJECTS365_DATASETS)}"
        )
    json_file, images = OBJECTS365_DATASETS[name]
    base = os.path.abspath(os.path.join(os.fspath(root), "objects365"))
    return os.path.join(base, json_file), os.path.join(base, images)


def _expected(name: str, root: str) -> List[Tuple[str, bool]]:
    """(path, is_folder) of every file and folder ``name`` needs."""
    json_file, image_root = objects365_files(name, root)
    expected = [(json_file, False), (image_root, True)]
    if _version(name) == "v2":
        # The v2 jsons name images as images/v1/patchN/... and images/v2/patchN/...
        expected.append((os.path.join(image_root, "images"), True))
    return expected


def _check_layout(name: str, root: str) -> None:
    expected = _expected(name, root)
    missing = [p for p, folder in expected if not (os.path.isdir if folder else os.path.isfile)(p)]
    if not missing:
        return
    listing = "\n".join(f"  {p}{'/' if folder else ''}" for p, folder in expected)
    raise Objects365LayoutError(
        f"Dataset '{name}' needs these files and folders under {os.path.abspath(root)} "
        f"($DETECTRON2_DATASETS):\n{listing}\nNot found: {', '.join(missing)}. The layout, and "
        "how to use mmdetection's, is described in dino_d2/data/objects365.py and MODEL_ZOO.md."
    )


def _first_difference(found: Sequence[str], expected: Sequence[str]) -> str:
    if len(found) != len(expected):
        return f"{len(found)} categories instead of {len(expected)}"
    i = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
    return (
        f"category {i} (in id order) is {found[i]!r} where the published list has {expected[i]!r}"
    )


def register_objects365(name: str, root: str) -> None:
    """Registers the Objects365 dataset ``name`` from its files under ``root/objects365``.

    Args:
        name: one of :data:`OBJECTS365_DATASETS`.
        root: the datasets root folder (``$DETECTRON2_DATASETS``).

    Raises:
        Objects365LayoutError: a file or folder is missing (the message lists them all).
        ValueError: the json's categories are not the 365 published names of its version.
    """
    _check_layout(name, root)
    json_file, image_root = objects365_files(name, root)
    register_coco_format_dataset(name, json_file, image_root)
    found = list(MetadataCatalog.get(name).thing_classes)
    expected = OBJECTS365_CLASSES[_version(name)]
    if found != list(expected):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        raise ValueError(
            f"{json_file} is not Objects365 {_version(name)}: "
            f"{_first_difference(found, expected)} (see dino_d2/data/objects365_classes.py)"
        )


for _name in OBJECTS365_DATASETS:
    register_builtin((_name,), functools.partial(register_objects365, _name))
