"""Every ground-truth field of an ``Instances`` as the tensors a loss or a matching cost reads.

DINO's own targets are ``labels`` and normalized ``boxes``; :func:`target_fields` adds the other
fields (masks, keypoints, anything a dataset mapper put there) under their ``Instances`` names,
so that an extension's loss finds them in ``targets[i][name]`` without an edit to DINO.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.structures import BitMasks, Boxes, Instances, Keypoints, PolygonMasks

__all__ = ["DINO_FIELDS", "masks_as_tensor", "target_fields"]

# The fields DINO itself turns into ``labels`` and ``boxes``.
DINO_FIELDS = ("gt_boxes", "gt_classes")


def masks_as_tensor(masks, image_size: Tuple[int, int], padded_size: Tuple[int, int]) -> Tensor:
    """Instance masks in the padded batch frame.

    Args:
        masks: a Detectron2 ``BitMasks`` or ``PolygonMasks`` (absolute pixel coordinates of the
            image), or a (G, h, w) tensor.
        image_size: the image's real (h, w).
        padded_size: (H_pad, W_pad) of the batch, at least ``image_size``.

    Returns:
        (G, H_pad, W_pad) uint8 in {0, 1}: the image's masks in the top-left ``image_size``
        region, zero on the padding. So a point at normalized (x, y) of the padded frame is the
        image's pixel (x * W_pad, y * H_pad), while normalized boxes are relative to
        ``image_size``: scale by ``image_size / padded_size`` to go from one to the other.
    """
    h, w = image_size
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, h, w).tensor
    elif isinstance(masks, BitMasks):
        masks = masks.tensor
    elif not isinstance(masks, Tensor):
        raise TypeError(
            f"gt_masks must be BitMasks, PolygonMasks or a tensor, got {type(masks).__name__}"
        )
    if masks.dim() != 3 or tuple(masks.shape[-2:]) != (h, w):
        raise ValueError(
            f"gt_masks must be (G, {h}, {w}) for an image of that size, got {tuple(masks.shape)}"
        )
    height, width = padded_size
    masks = masks.to(torch.uint8)
    return F.pad(masks, (0, width - w, 0, height - h))


def target_fields(
    instances: Instances, keep: Optional[Tensor], padded_size: Tuple[int, int]
) -> Dict[str, Tensor]:
    """The fields of ``instances`` beyond :data:`DINO_FIELDS`, as tensors, one row per box.

    ``gt_masks`` become (G, H_pad, W_pad) uint8 (:func:`masks_as_tensor`); any other structure
    with a ``tensor`` attribute (``Boxes``, ``Keypoints``, ``BitMasks``) gives that tensor; a
    tensor stays as it is.

    Args:
        instances: one image's ground truth; ``instances.image_size`` is its real (h, w).
        keep: (G,) bool, the boxes DINO keeps (None: all).
        padded_size: (H_pad, W_pad) of the batch.

    Returns:
        field name -> tensor of G' = kept rows.
    """
    fields = {}
    for name, value in instances.get_fields().items():
        if name in DINO_FIELDS:
            continue
        if name == "gt_masks":
            value = masks_as_tensor(value, instances.image_size, padded_size)
        elif isinstance(value, (Boxes, BitMasks, Keypoints)):
            value = value.tensor
        if not isinstance(value, Tensor):
            raise TypeError(
                f"instances field '{name}' is a {type(value).__name__}; a target field must be a "
                "tensor or a structure with a .tensor (Boxes, BitMasks, Keypoints)"
            )
        fields[name] = value if keep is None else value[keep.to(value.device)]
    return fields
