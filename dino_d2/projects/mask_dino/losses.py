"""Mask DINO's mask loss terms: sigmoid BCE and dice on sampled points (as Mask2Former).

For the matched pairs of a query set, ``num_points`` points are chosen per pair by importance
sampling on the predicted mask logits (Detectron2 PointRend's
``get_uncertain_point_coords_with_randomness``: ``oversample_ratio * num_points`` random
candidates, the ``importance_sample_ratio`` most uncertain (logit nearest 0) kept, the rest
uniform); predictions and targets are read at those points with ``point_sample`` (bilinear). Both
live in the padded batch frame (``DINO.prepare_targets``), so the same normalized coordinates
address the same pixel. The two terms share the points of a set (``MatchedQueries.cache``).

* ``loss_mask``: binary cross-entropy with logits, mean over the points, summed over pairs,
  divided by ``num_boxes``.
* ``loss_dice``: ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid``, summed
  over pairs, divided by ``num_boxes``.

A set whose head gives no masks (``mask_logits``) returns None.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

from dino_d2.modeling import LOSSES, MatchedQueries

__all__ = ["dice_loss", "loss_dice", "loss_mask", "sampled_mask_points"]

MASKS = "mask_logits"


def _uncertainty(logits: Tensor) -> Tensor:
    return -logits.abs()


def sampled_mask_points(
    matched: MatchedQueries,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
) -> Optional[Tuple[Tensor, Tensor]]:
    """The matched pairs' predicted logits and target values at the sampled points.

    Returns:
        ``(logits, labels)``, each (P, num_points) float (labels in {0, 1}); None when the set
        has no masks. Computed once per set and options.
    """
    key = f"{MASKS}_points_{num_points}_{oversample_ratio}_{importance_sample_ratio}"
    if key in matched.cache:
        return matched.cache[key]
    masks = matched.queries.extra(MASKS)
    if masks is None:
        return None
    predicted = masks[matched.batch_idx, matched.query_idx][:, None]
    targets = matched.target_field("gt_masks")[:, None].to(predicted.dtype)
    with torch.no_grad():
        coords = get_uncertain_point_coords_with_randomness(
            predicted.float(), _uncertainty, num_points, oversample_ratio, importance_sample_ratio
        ).to(predicted.dtype)
        labels = point_sample(targets, coords, align_corners=False).squeeze(1)
    logits = point_sample(predicted, coords, align_corners=False).squeeze(1)
    matched.cache[key] = logits, labels
    return logits, labels


def dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(P, S) logits and {0, 1} labels -> (P,) dice loss of each row."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    return 1 - (numerator + 1) / (probs.sum(-1) + labels.sum(-1) + 1)


@LOSSES.register()
def loss_mask(matched: MatchedQueries, **sampling) -> Optional[Tensor]:
    """Point-sampled sigmoid BCE of the matched masks (see the module docstring)."""
    points = sampled_mask_points(matched, **sampling)
    if points is None:
        return None
    logits, labels = points
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return bce.mean(1).sum() / matched.num_boxes


@LOSSES.register()
def loss_dice(matched: MatchedQueries, **sampling) -> Optional[Tensor]:
    """Point-sampled dice loss of the matched masks (see the module docstring)."""
    points = sampled_mask_points(matched, **sampling)
    if points is None:
        return None
    return dice_loss(*points).sum() / matched.num_boxes
