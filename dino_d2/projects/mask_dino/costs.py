"""Mask DINO's mask matching cost: sigmoid BCE plus dice on one shared set of random points."""

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.projects.point_rend.point_features import point_sample

from dino_d2.modeling import MATCHING_COSTS

__all__ = ["cost_mask"]


@MATCHING_COSTS.register()
def cost_mask(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    gt_boxes: Tensor,
    mask_logits: Tensor,
    gt_masks: Tensor,
    *,
    num_points: int = 12544,
    dice_weight: float = 1.0,
) -> Tensor:
    """``BCE + dice_weight * dice`` of every query's mask against every target's.

    Both costs are read at the same ``num_points`` uniform random points of the padded frame
    (the masks' common frame), as Mask DINO's matcher does; the BCE is the mean over the points,
    the dice ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``. With the weight 5 in ``costs``
    and ``dice_weight`` 1 this is the authors' ``5 * BCE + 5 * dice``.

    Args:
        mask_logits: (M, H_4, W_4) the queries' mask logits (the mask head's output).
        gt_masks: (G, H_pad, W_pad) {0, 1} target masks (``DINO.prepare_targets``).

    Returns:
        (M, G) float32 cost.
    """
    coords = torch.rand(1, num_points, 2, device=mask_logits.device)
    predicted = point_sample(
        mask_logits[:, None].float(), coords.expand(len(mask_logits), -1, -1), align_corners=False
    )
    target = point_sample(
        gt_masks[:, None].float(), coords.expand(len(gt_masks), -1, -1), align_corners=False
    )
    predicted, target = predicted.squeeze(1), target.squeeze(1)
    positive = F.binary_cross_entropy_with_logits(
        predicted, torch.ones_like(predicted), reduction="none"
    )
    negative = F.binary_cross_entropy_with_logits(
        predicted, torch.zeros_like(predicted), reduction="none"
    )
    bce = (positive @ target.T + negative @ (1 - target).T) / num_points
    probs = predicted.sigmoid()
    dice = 1 - (2 * probs @ target.T + 1) / (probs.sum(-1)[:, None] + target.sum(-1)[None] + 1)
    return bce + dice_weight * dice
