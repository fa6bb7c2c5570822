"""DINO's loss terms: named functions of one supervised set of queries and its matched targets.

Every term is registered in :data:`dino_d2.modeling.LOSSES` and takes a :class:`MatchedQueries`
(the query set's predictions, the batch's targets, the assignment of queries to targets and the
normalizer ``num_boxes``) plus keyword options, and returns an unweighted scalar. The three terms
of DINO, computed as the DINO authors compute them:

* ``loss_class``: sigmoid focal loss (alpha 0.25, gamma 2) against one-hot targets, background
  = all zeros, over every query of the set, normalized like the authors:
  ``focal.mean(dim=queries).sum() / num_boxes * num_queries_in_the_set``.
* ``loss_bbox``: L1 on normalized cxcywh of the matched queries, summed, divided by ``num_boxes``.
* ``loss_giou``: ``1 - GIoU`` of the matched queries (torchvision's GIoU, the diagonal of the
  pairwise matrix as the authors take it), summed, divided by ``num_boxes``.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .registry import LOSSES
from .transformer import DINOTransformerOutput

__all__ = ["QuerySet", "MatchedQueries", "loss_class", "loss_bbox", "loss_giou"]


@dataclass
class QuerySet:
    """One set of queries that the criterion supervises.

    Attributes:
        suffix: the key suffix of its losses: ``"_0"`` .. for the earlier decoder layers, ``""``
            for the last one, ``"_enc"`` for the encoder proposals, ``"_dn"``, ``"_dn_0"``, ...
            for the denoising queries of each decoder layer.
        logits: (N, Q_s, K) class logits.
        boxes: (N, Q_s, 4) boxes, normalized cxcywh.
        layer: the decoder layer, or None for the encoder proposals.
        queries: the slice of the decoder's query axis (DN queries first) that the set takes,
            or None for the encoder proposals.
        outputs: the whole transformer output, for terms that need more (hidden states,
            memory, extra heads' outputs).
    """

    suffix: str
    logits: Tensor
    boxes: Tensor
    layer: Optional[int]
    queries: Optional[slice]
    outputs: DINOTransformerOutput

    @property
    def is_denoising(self) -> bool:
        return self.suffix.startswith("_dn")

    def extra(self, name: str) -> Optional[Tensor]:
        """This set's part of an extra head's output: for a decoder set, of the per-query
        ``outputs.extras[name]`` ((L_dec, N, Q_dn + Q, ...) -> (N, Q_s, ...)); for the encoder
        proposals ``outputs.enc_extras[name]`` (N, Q, ...), or None when the head gives none."""
        if self.layer is None:
            return self.outputs.enc_extras.get(name)
        return self.outputs.extras[name][self.layer][:, self.queries]

    def extras(self) -> Dict[str, Tensor]:
        """Every extra output this set has, by name, each (N, Q_s, ...)."""
        names = self.outputs.enc_extras if self.layer is None else self.outputs.extras
        return {name: self.extra(name) for name in names}


class MatchedQueries:
    """A query set, the targets and the assignment: what every loss term receives.

    Args:
        queries: the :class:`QuerySet`.
        targets: N dicts with ``labels`` (G_i,) int64 and ``boxes`` (G_i, 4) normalized cxcywh.
        indices: N pairs ``(query_idx, target_idx)``: query ``query_idx[j]`` of image i is
            assigned target ``target_idx[j]`` (from the matcher, or fixed for denoising).
        num_boxes: the normalizer (targets in the batch, averaged over workers; times the
            number of groups for denoising).

    The gathered pairs (``batch_idx``, ``query_idx``, ``target_labels``, ``target_boxes``,
    ``matched_boxes``) are computed once and shared by the terms; ``cache`` is a dict where
    terms of the same set share other work (e.g. the points two mask losses sample).
    """

    def __init__(
        self,
        queries: QuerySet,
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_boxes: float,
    ):
        self.queries = queries
        self.targets = targets
        self.indices = indices
        self.num_boxes = num_boxes
        self.cache: Dict[str, object] = {}

    @property
    def device(self) -> torch.device:
        return self.queries.logits.device

    @cached_property
    def batch_idx(self) -> Tensor:
        """(P,) image of each matched pair."""
        return torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(self.indices)]).to(
            self.device
        )

    @cached_property
    def query_idx(self) -> Tensor:
        """(P,) query (within the set) of each matched pair."""
        return torch.cat([q for q, _ in self.indices]).to(self.device)

    @cached_property
    def target_labels(self) -> Tensor:
        """(P,) int64 class of each matched pair's target."""
        return torch.cat(
            [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(self.targets, self.indices)]
        ).to(self.device)

    @cached_property
    def target_boxes(self) -> Tensor:
        """(P, 4) normalized cxcywh box of each matched pair's target."""
        return torch.cat(
            [t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(self.targets, self.indices)]
        ).to(device=self.device, dtype=self.queries.boxes.dtype)

    def target_field(self, name: str) -> Tensor:
        """(P, ...) the field ``name`` of each matched pair's target (e.g. ``gt_masks``, see
        ``DINO.prepare_targets``)."""
        missing = [i for i, t in enumerate(self.targets) if name not in t]
        if missing:
            raise KeyError(
                f"targets of images {missing} have no field '{name}' (they have "
                f"{sorted(self.targets[missing[0]])}); does the dataset mapper produce it?"
            )
        return torch.cat(
            [t[name][j.to(t[name].device)] for t, (_, j) in zip(self.targets, self.indices)]
        ).to(self.device)

    @cached_property
    def matched_boxes(self) -> Tensor:
        """(P, 4) predicted box of each matched pair."""
        return self.queries.boxes[self.batch_idx, self.query_idx]


@LOSSES.register()
def loss_class(matched: MatchedQueries, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss over every query and class of the set (see the module docstring)."""
    logits = matched.queries.logits
    onehot = torch.zeros_like(logits)
    onehot[matched.batch_idx, matched.query_idx, matched.target_labels] = 1.0
    focal = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    return focal.mean(1).sum() / matched.num_boxes * logits.shape[1]


@LOSSES.register()
def loss_bbox(matched: MatchedQueries) -> Tensor:
    """L1 between matched predicted and target boxes (normalized cxcywh), over ``num_boxes``."""
    loss = F.l1_loss(matched.matched_boxes, matched.target_boxes, reduction="none")
    return loss.sum() / matched.num_boxes


@LOSSES.register()
def loss_giou(matched: MatchedQueries) -> Tensor:
    """``1 - GIoU`` of the matched pairs, over ``num_boxes``."""
    giou = torch.diag(
        generalized_box_iou(
            box_convert(matched.matched_boxes, "cxcywh", "xyxy"),
            box_convert(matched.target_boxes, "cxcywh", "xyxy"),
        )
    )
    return (1 - giou).sum() / matched.num_boxes
