"""Mask-enhanced anchor initialisation (Mask DINO, Sec. 3.3): the decoder's anchors are the
boxes of the selected proposals' predicted masks instead of their regressed boxes."""

from typing import Optional

import torch
from torch import Tensor

from dino_d2.layers.box_ops import inverse_sigmoid

__all__ = ["MASK_BOX_INITS", "mask_anchors", "mask_boxes"]

# "mask2box": the extreme pixels (Mask DINO's fast conversion, right/bottom edge at the last
# pixel's index); "bitmask": Detectron2's BitMasks.get_bounding_boxes (one pixel more).
MASK_BOX_INITS = ("mask2box", "bitmask")


def mask_boxes(masks: Tensor, kind: str) -> Tensor:
    """Absolute XYXY boxes (in mask cells) of binary masks.

    Args:
        masks: (..., H, W) bool.
        kind: one of :data:`MASK_BOX_INITS`.

    Returns:
        (..., 4) float XYXY; all zeros for an empty mask.
    """
    if kind not in MASK_BOX_INITS:
        raise ValueError(f"mask_box_init must be one of {MASK_BOX_INITS} or None, got {kind!r}")
    height, width = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)
    ys = torch.arange(height, device=masks.device, dtype=torch.float32)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32)
    # Infinity, not the map's size, as the sentinel: an exported graph keeps H and W symbolic.
    x0 = torch.where(cols, xs, float("inf")).amin(-1)
    y0 = torch.where(rows, ys, float("inf")).amin(-1)
    x1 = torch.where(cols, xs, -1.0).amax(-1)
    y1 = torch.where(rows, ys, -1.0).amax(-1)
    if kind == "bitmask":
        x1, y1 = x1 + 1, y1 + 1
    boxes = torch.stack([x0, y0, x1, y1], -1)
    return torch.where(cols.any(-1)[..., None], boxes, torch.zeros_like(boxes))


def mask_anchors(
    mask_logits: Tensor,
    anchors: Tensor,
    valid_ratio: Tensor,
    kind: Optional[str],
    eps: float = 1e-5,
) -> Tensor:
    """The anchors (logit space) of the boxes of ``mask_logits > 0``.

    Boxes are normalized by each image's valid region in the mask map (``valid_ratio`` of its
    size), so that they are relative to the real image like DINO's boxes (Mask DINO divides by
    the padded map; the two agree on an unpadded image). A proposal whose mask is empty keeps
    its own anchor.

    Args:
        mask_logits: (N, Q, H, W) the proposals' mask logits.
        anchors: (N, Q, 4) their anchors in logit space (normalized cxcywh after sigmoid).
        valid_ratio: (N, 2) ``(valid_width / W, valid_height / H)`` of each image.
        kind: one of :data:`MASK_BOX_INITS`, or None to keep ``anchors``.
        eps: the clamp of ``inverse_sigmoid`` (Mask DINO's 1e-5: a mask's box often touches
            the image border, where the clamp decides the anchor).

    Returns:
        (N, Q, 4) anchors in logit space, detached.
    """
    if kind is None:
        return anchors
    masks = mask_logits.detach() > 0
    boxes = mask_boxes(masks, kind)
    height, width = masks.shape[-2:]
    size = valid_ratio.to(boxes.dtype) * torch.tensor([width, height], device=boxes.device)
    size = size[:, None].repeat(1, 1, 2)
    x0, y0, x1, y1 = (boxes / size).unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    nonempty = masks.flatten(2).any(-1)[..., None]
    return torch.where(nonempty, inverse_sigmoid(cxcywh, eps), anchors).detach()
