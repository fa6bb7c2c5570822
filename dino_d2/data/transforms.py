"""DETR's training augmentation written with Detectron2's own augmentation machinery.

DETR, Deformable DETR and DINO all train with the same policy (the authors'
``datasets/coco.py: make_coco_transforms``)::

    RandomHorizontalFlip
    RandomSelect(                                  # p = 0.5 each
        RandomResize(min_sizes, max_size),
        Compose(RandomResize((400, 500, 600)), RandomSizeCrop(384, 600),
                RandomResize(min_sizes, max_size)),
    )

Detectron2 has no "pick one of these branches" augmentation, which is why detrex ships its own
``DetrDatasetMapper`` taking two augmentation lists. :class:`RandomChoice` fills that gap, so the
whole policy is a plain ``list[Augmentation]`` and Detectron2's standard
``DatasetMapper(is_train=True, augmentations=detr_train_augmentation(), image_format="RGB")`` can
be used unchanged.

Boxes follow Detectron2's conventions throughout: absolute XYXY pixels (``AugInput.boxes``), and
``detection_utils.transform_instance_annotations`` clips them to the augmented image; the
``DatasetMapper`` then drops instances left empty by a crop.

Detectron2 v0.6 and main agree on everything used here (``Augmentation.__call__`` calls
``get_transform`` with the ``AugInput`` attributes named by its arguments, then
``aug_input.transform``; ``AugmentationList.__call__`` applies each augmentation in turn and
returns a ``TransformList``). One difference matters: v0.6 wraps a bare ``Transform`` given to
``AugmentationList`` in a class defined inside a function, which cannot be pickled (so a mapper
holding one cannot be sent to spawned data-loader workers); main defines it at module level.
:class:`RandomChoice` therefore wraps bare transforms itself, with a module-level class.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from detectron2.data import transforms as T

__all__ = ["RandomChoice", "detr_train_augmentation", "detr_test_augmentation"]

_DETR_MIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)

AugmentationLike = Union[T.Augmentation, T.Transform]


class _FixedTransform(T.Augmentation):
    """An augmentation that always returns the same deterministic transform (picklable)."""

    def __init__(self, transform: T.Transform):
        super().__init__()
        self.transform = transform

    def get_transform(self, image) -> T.Transform:
        return self.transform

    def __repr__(self) -> str:
        return repr(self.transform)

    __str__ = __repr__


def _as_augmentation(item: AugmentationLike) -> T.Augmentation:
    if isinstance(item, T.Augmentation):
        return item
    if isinstance(item, T.Transform):
        return _FixedTransform(item)
    raise TypeError(f"expected an Augmentation or a Transform, got {type(item).__name__}")


class RandomChoice(T.Augmentation):
    """Applies one of several augmentation branches, chosen at random for each input.

    The branch is drawn with ``np.random`` (the global generator), like every Detectron2
    augmentation, so Detectron2's per-worker seeding makes it reproducible. Each branch is applied
    as an ``AugmentationList``: its augmentations run one after the other on the ``AugInput``
    (image, boxes and sem_seg are transformed in place), and ``__call__`` returns the chosen
    branch's ``TransformList``, which Detectron2's ``DatasetMapper`` then uses for the annotations.
    It can itself be an element of an ``AugmentationList`` or of another branch.

    ``get_transform`` is not available (as for ``AugmentationList``): the later augmentations of
    a branch need the output of the earlier ones.

    Args:
        choices: the branches; each is a sequence of augmentations (or deterministic transforms),
            or a single one.
        probabilities: probability of each branch, non-negative and summing to 1; ``None``
            chooses uniformly.
    """

    def __init__(
        self,
        choices: Sequence[Union[AugmentationLike, Sequence[AugmentationLike]]],
        probabilities: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        branches = []
        for choice in choices:
            items = [choice] if isinstance(choice, (T.Augmentation, T.Transform)) else list(choice)
            branches.append(T.AugmentationList([_as_augmentation(x) for x in items]))
        if not branches:
            raise ValueError("RandomChoice needs at least one branch")
        if probabilities is None:
            probabilities = [1.0 / len(branches)] * len(branches)
        probabilities = tuple(float(p) for p in probabilities)
        if len(probabilities) != len(branches):
            raise ValueError(
                f"RandomChoice got {len(branches)} branches but {len(probabilities)} probabilities"
            )
        if min(probabilities) < 0 or not math.isclose(sum(probabilities), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"RandomChoice probabilities must be non-negative and sum to 1, got {probabilities}"
            )
        self.branches = tuple(branches)
        self.probabilities = probabilities

    def get_transform(self, *args) -> T.Transform:
        raise NotImplementedError("RandomChoice has no get_transform; call it on an AugInput")

    def __call__(self, aug_input) -> T.TransformList:
        """Applies one branch to ``aug_input`` in place and returns the transforms it used."""
        index = np.random.choice(len(self.branches), p=self.probabilities)
        return self.branches[index](aug_input)

    def __repr__(self) -> str:
        branches = ", ".join(str(b) for b in self.branches)
        return f"RandomChoice([{branches}], probabilities={self.probabilities})"

    __str__ = __repr__


def _int_tuple(values) -> Tuple[int, ...]:
    # LazyConfig hands sequences over as omegaconf ListConfig; Detectron2 expects plain values.
    return tuple(int(v) for v in values)


def detr_train_augmentation(
    *,
    min_sizes: Sequence[int] = _DETR_MIN_SIZES,
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    crop_prob: float = 0.5,
    horizontal_flip: bool = True,
) -> list:
    """The DETR/DINO training augmentation as a list for Detectron2's ``DatasetMapper``.

    ``RandomFlip``, then with probability ``1 - crop_prob`` a resize of the shorter side to one
    of ``min_sizes`` (longer side at most ``max_size``), otherwise a resize of the shorter side
    to one of ``crop_resize_sizes`` (no limit on the longer side), a random crop whose height and
    width are each drawn in ``[crop_size[0], min(side, crop_size[1])]`` (Detectron2's
    ``"absolute_range"`` crop), and the same resize as the first branch. These are the authors'
    values and also detrex's ``coco_detr.py``.

    Args:
        min_sizes: shorter-side lengths, one chosen uniformly per image.
        max_size: the longest allowed longer side after the final resize.
        crop_resize_sizes: shorter-side lengths used before cropping.
        crop_size: ``(min, max)`` side length of the crop, in pixels.
        crop_prob: probability of the crop branch; 0 gives the resize-only policy.
        horizontal_flip: flip horizontally with probability 0.5 first (False for data whose
            classes change under mirroring, such as digits).

    Returns:
        list[Augmentation] to pass as ``augmentations`` of ``DatasetMapper``.
    """
    min_sizes = _int_tuple(min_sizes)
    crop_low, crop_high = _int_tuple(crop_size)
    if crop_low > crop_high:
        raise ValueError(f"crop_size must be (min, max), got {(crop_low, crop_high)}")

    def final_resize():
        return T.ResizeShortestEdge(min_sizes, max_size=int(max_size), sample_style="choice")

    resize_branch = [final_resize()]
    crop_branch = [
        T.ResizeShortestEdge(_int_tuple(crop_resize_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", (crop_low, crop_high)),
        final_resize(),
    ]
    augmentations = [T.RandomFlip(horizontal=True, vertical=False)] if horizontal_flip else []
    augmentations.append(
        RandomChoice([resize_branch, crop_branch], probabilities=(1.0 - crop_prob, crop_prob))
    )
    return augmentations


def detr_test_augmentation(*, min_size: int = 800, max_size: int = 1333) -> list:
    """The DETR/DINO inference resize: shorter side to ``min_size``, longer side at most ``max_size``.

    Note: the shorter side matches the authors' resize exactly, but Detectron2 rounds the longer
    side (``int(x + 0.5)``, and sets it to ``max_size`` when that binds) where the authors
    truncate it, so the longer side can differ from the authors' evaluation by one pixel.

    Returns:
        list[Augmentation] to pass as ``augmentations`` of ``DatasetMapper(is_train=False)``.
    """
    return [T.ResizeShortestEdge(int(min_size), max_size=int(max_size), sample_style="choice")]
