"""Initialising a model's class heads from a checkpoint trained on another label set.

A checkpoint trained on dataset A (``num_source`` classes) initialises a model for dataset B
(``num_target`` classes) when a :class:`ClassMap` says which class of A each class of B starts
from. :func:`remap_class_rows` rewrites the checkpoint's class heads into the model's shape: row
``j`` of every class head is row ``rows[j]`` of the checkpoint's, and rows with ``rows[j] is
None`` keep the model's own (fresh) initialisation. Everything else in the state dict is left as
it is; Detectron2's loader then loads the result without a shape mismatch.

The class heads are the parameters with one row per class: each decoder layer's and the encoder's
(query selection's) ``class_embed`` weight ``(K, C)`` and bias ``(K,)``, and the denoising label
embedding ``label_enc.weight`` ``(K, C)`` (:func:`is_class_head`).

Maps are looked up by name (:func:`get_class_map`), so that a config can name one
(``train.init_class_map="objects365_v2_to_coco"``); add one with :func:`register_class_map`.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..data.objects365_coco_map import coco_thing_classes, objects365_to_coco_rows

__all__ = [
    "ClassMap",
    "is_class_head",
    "remap_class_rows",
    "log_class_map",
    "register_class_map",
    "get_class_map",
    "class_map_names",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMap:
    """Which source class each target class starts from.

    Attributes:
        name: a name for the messages.
        rows: one entry per target class, in the target's contiguous order: the contiguous index
            of its source class in ``[0, num_source)``, or None to keep the fresh initialisation.
            No source row appears twice.
        num_source: the number of classes of the source (the checkpoint's class-head rows).
        target_classes: the target's class names, for the messages (may be empty).
    """

    name: str
    rows: Tuple[Optional[int], ...]
    num_source: int
    target_classes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        used = [r for r in self.rows if r is not None]
        bad = [r for r in used if not 0 <= r < self.num_source]
        if bad:
            raise ValueError(
                f"class map '{self.name}': source rows {bad} are outside [0, {self.num_source})"
            )
        if len(set(used)) != len(used):
            raise ValueError(f"class map '{self.name}': a source row is used twice: {used}")
        if self.target_classes and len(self.target_classes) != len(self.rows):
            raise ValueError(
                f"class map '{self.name}': {len(self.target_classes)} target class names for "
                f"{len(self.rows)} rows"
            )

    @property
    def num_target(self) -> int:
        return len(self.rows)

    def unmatched(self) -> Tuple[int, ...]:
        """The target classes that keep their fresh initialisation."""
        return tuple(j for j, r in enumerate(self.rows) if r is None)


def is_class_head(name: str) -> bool:
    """Whether the state-dict entry ``name`` has one row per class: the encoder / decoder class
    heads (``class_embed``, ``class_embed.<layer>``) and the denoising label embedding."""
    return ".class_embed." in f".{name}" or name.endswith("label_enc.weight")


def remap_class_rows(
    weights: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    class_map: ClassMap,
) -> Dict[str, torch.Tensor]:
    """The checkpoint's weights with every class head gathered by ``class_map``.

    Args:
        weights: the checkpoint's model state dict (source label set).
        model_state: the model's own state dict (target label set, fresh class heads).
        class_map: target class ``j`` takes source row ``class_map.rows[j]``.

    Returns:
        a new dict: ``weights`` with each class head that the model also has replaced by a
        tensor of the model's shape (first dimension ``class_map.num_target``) whose row ``j``
        is the checkpoint's row ``rows[j]``, or the model's own row ``j`` where ``rows[j]`` is
        None. Class heads the model lacks, and all other entries, are passed on unchanged.

    Raises:
        ValueError: no class head of the model is in ``weights``; or a class head of
            ``weights`` does not have ``num_source`` rows, or the model's does not have
            ``num_target`` rows (the message names the entry and both sizes).
    """
    remapped = dict(weights)
    heads = [k for k in weights if is_class_head(k) and k in model_state]
    if not heads:
        raise ValueError(
            f"class map '{class_map.name}': the checkpoint has none of the model's class heads "
            f"(class_embed, label_enc); checkpoint keys start with {sorted(weights)[:3]}"
        )
    source = [j for j, r in enumerate(class_map.rows) if r is not None]
    index = torch.as_tensor([class_map.rows[j] for j in source], dtype=torch.long)
    for key in heads:
        found, own = weights[key], model_state[key]
        if found.shape[0] != class_map.num_source:
            raise ValueError(
                f"class map '{class_map.name}' maps {class_map.num_source} source classes, but "
                f"the checkpoint's {key} has {found.shape[0]} rows (shape {tuple(found.shape)}): "
                "the checkpoint was not trained on the map's source label set"
            )
        if own.shape[0] != class_map.num_target or own.shape[1:] != found.shape[1:]:
            raise ValueError(
                f"class map '{class_map.name}' maps onto {class_map.num_target} classes of width "
                f"{tuple(found.shape[1:])}, but the model's {key} has shape {tuple(own.shape)}: "
                f"set model.num_classes={class_map.num_target}"
            )
        head = own.detach().clone().to(found.dtype)
        head[source] = found.index_select(0, index).to(head.device)
        remapped[key] = head
    return remapped


def log_class_map(class_map: ClassMap, path: str) -> None:
    """Logs the one line of a class-mapped initialisation: matched and unmatched counts, and the
    unmatched classes by name (by index when the map has no names)."""
    unmatched = class_map.unmatched()
    names = class_map.target_classes
    listed = ", ".join(names[j] if names else str(j) for j in unmatched)
    logger.info(
        f"Class map '{class_map.name}' applied to {path}: "
        f"{class_map.num_target - len(unmatched)} of {class_map.num_target} classes matched "
        f"(class heads initialised from the checkpoint's rows), {len(unmatched)} unmatched "
        f"(fresh initialisation){': ' + listed if listed else ''}"
    )


_CLASS_MAPS: Dict[str, Callable[[], ClassMap]] = {}


def register_class_map(name: str, factory: Callable[[], ClassMap]) -> None:
    """Makes ``factory()`` available as ``get_class_map(name)``."""
    _CLASS_MAPS[name] = factory


def class_map_names() -> Tuple[str, ...]:
    """The names :func:`get_class_map` knows."""
    return tuple(sorted(_CLASS_MAPS))


def get_class_map(name: str) -> ClassMap:
    """The class map registered under ``name``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in _CLASS_MAPS:
        raise KeyError(f"unknown class map {name!r}; known: {', '.join(class_map_names())}")
    return _CLASS_MAPS[name]()


def _objects365_to_coco(version: str) -> Callable[[], ClassMap]:
    def factory() -> ClassMap:
        rows: Sequence[Optional[int]] = objects365_to_coco_rows(version)
        return ClassMap(
            name=f"objects365_{version}_to_coco",
            rows=tuple(rows),
            num_source=365,
            target_classes=tuple(coco_thing_classes()),
        )

    return factory


for _version in ("v1", "v2"):
    register_class_map(f"objects365_{_version}_to_coco", _objects365_to_coco(_version))
