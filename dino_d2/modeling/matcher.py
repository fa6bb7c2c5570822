"""One-to-one Hungarian matching between predicted queries and ground-truth boxes."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth box of an image to a distinct query, minimizing a matching cost.

    The cost of query q for target t is, as in the DINO authors' matcher::

        cost_bbox * L1(box_q, box_t) + cost_class * focal(q, label_t) - cost_giou * GIoU(q, t)

    where ``focal(q, k) = alpha (1 - p)^gamma (-log(p + 1e-8))
    - (1 - alpha) p^gamma (-log(1 - p + 1e-8))`` with ``p = sigmoid(logit_qk)``: the focal loss
    of calling q class k minus that of calling it background. L1 is on normalized cxcywh, GIoU on
    the xyxy corners (torchvision's GIoU, whose enclosing-area denominator has no 1e-6 eps).
    Each image is solved on its own with :func:`scipy.optimize.linear_sum_assignment`; unmatched
    queries are background.

    Args:
        cost_class: weight of the focal class cost.
        cost_bbox: weight of the L1 box cost.
        cost_giou: weight of the negative GIoU cost.
        alpha: focal alpha of the class cost.
        gamma: focal gamma of the class cost.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor
    ) -> Tensor:
        """The (Q, G) matching cost of one image.

        Args:
            logits: (Q, K) class logits.
            boxes: (Q, 4) predicted boxes, normalized cxcywh.
            labels: (G,) int64 target classes.
            gt_boxes: (G, 4) target boxes, normalized cxcywh.

        Returns:
            (Q, G) float32 cost; lower is a better match.
        """
        prob = logits.float().sigmoid()
        boxes = boxes.float()
        gt_boxes = gt_boxes.float()
        neg_cost = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        class_cost = pos_cost[:, labels] - neg_cost[:, labels]
        bbox_cost = torch.cdist(boxes, gt_boxes, p=1)
        giou_cost = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")
        )
        return (
            self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost
        )

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Matches every image of the batch.

        Args:
            pred_logits: (N, Q, K) class logits.
            pred_boxes: (N, Q, 4) predicted boxes, normalized cxcywh.
            targets: N dicts with ``labels`` (G_i,) int64 and ``boxes`` (G_i, 4) normalized cxcywh.

        Returns:
            N pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length ``min(Q, G_i)``
            (empty for an image without targets): query ``query_idx[j]`` is matched to target
            ``target_idx[j]``; ``query_idx`` is sorted.
        """
        indices = []
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, labels, target["boxes"]).cpu()
            query_idx, target_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices
