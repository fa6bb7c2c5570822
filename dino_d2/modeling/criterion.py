"""DINO's training losses: matching, auxiliary, encoder-proposal and denoising losses.

Every supervised set of queries gets the same three losses, as the DINO authors compute them:

* ``loss_class``: sigmoid focal loss (alpha 0.25, gamma 2) against one-hot targets, background
  = all zeros, over every query of the set. Normalized like the authors, i.e.
  ``focal.mean(dim=queries).sum() / num_boxes * num_queries_in_the_set`` (numerically the sum over
  all queries and classes divided by ``num_boxes``, in the authors' order of operations).
* ``loss_bbox``: L1 on normalized cxcywh of the matched queries, summed, divided by ``num_boxes``.
* ``loss_giou``: ``1 - GIoU`` of the matched queries (torchvision's GIoU, the diagonal of the
  pairwise matrix as the authors take it), summed, divided by ``num_boxes``.

``num_boxes`` is the number of target boxes in the batch, averaged over workers when
torch.distributed is initialized, and clamped to at least 1.

The sets: the last decoder layer (``loss_class``, ...), every earlier decoder layer ``i``
(``loss_class_i``, ...), the selected encoder proposals (``loss_class_enc``, ...; the authors'
"interm" loss, matched with the same matcher) and the denoising queries of every decoder layer
(``loss_class_dn``, ``loss_class_dn_i``, ...). The DN sets use the fixed assignment of
:class:`DenoisingQueries` instead of the matcher: positive queries take their box's class and box
targets, negative and padding queries are background for the class loss and take no box loss, and
``num_boxes`` is multiplied by the number of DN groups. When there are no DN queries (``dn`` is
None) the DN keys are still returned, as zeros, so the set of keys never changes.

All losses are returned already multiplied by their weight; the same weights apply to every set
(as in the authors' configuration), and the keys are derived from ``num_decoder_layers``.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .denoising import DenoisingQueries
from .matcher import HungarianMatcher

__all__ = ["DINOCriterion"]

_LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


class DINOCriterion(nn.Module):
    """Computes DINO's weighted training losses from the transformer outputs.

    Args:
        num_classes: number of classes K (the last dim of the logits).
        matcher: the :class:`HungarianMatcher` used for the decoder layers and encoder proposals.
        num_decoder_layers: L, the number of decoder layers whose outputs are supervised.
        class_weight: weight of every ``loss_class*``.
        bbox_weight: weight of every ``loss_bbox*``.
        giou_weight: weight of every ``loss_giou*``.
        focal_alpha: focal loss alpha.
        focal_gamma: focal loss gamma.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        num_decoder_layers: int,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.num_decoder_layers = num_decoder_layers
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        base = dict(zip(_LOSS_NAMES, (class_weight, bbox_weight, giou_weight)))
        self.weight_dict = {
            name + suffix: weight for suffix in self._suffixes() for name, weight in base.items()
        }

    def _layer_suffixes(self) -> List[str]:
        last = self.num_decoder_layers - 1
        return [f"_{i}" if i < last else "" for i in range(self.num_decoder_layers)]

    def _suffixes(self) -> List[str]:
        layers = self._layer_suffixes()
        return layers + ["_enc"] + ["_dn" + s for s in layers]

    def forward(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        dn: Optional[DenoisingQueries] = None,
    ) -> Dict[str, Tensor]:
        """Computes all losses of a batch.

        Args:
            outputs: the transformer's dict: ``pred_logits`` (L, N, Q_dn + Q, K) and
                ``pred_boxes`` (L, N, Q_dn + Q, 4) normalized cxcywh, DN queries first
                (Q_dn = 0 when ``dn`` is None); ``enc_logits`` (N, Q, K) and ``enc_boxes``
                (N, Q, 4) normalized cxcywh of the selected encoder proposals.
            targets: N dicts with ``labels`` (G_i,) int64 in [0, K) and ``boxes`` (G_i, 4)
                normalized cxcywh.
            dn: the :class:`DenoisingQueries` the DN part was built from, or None.

        Returns:
            Scalar losses, already weighted, keyed as in ``self.weight_dict``.
        """
        pred_logits = outputs["pred_logits"]
        pred_boxes = outputs["pred_boxes"]
        if pred_logits.shape[0] != self.num_decoder_layers:
            raise ValueError(
                f"expected outputs of {self.num_decoder_layers} decoder layers, "
                f"got {pred_logits.shape[0]}"
            )
        if pred_logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {pred_logits.shape[-1]}")
        num_dn = 0 if dn is None else dn.num_dn_queries
        if dn is not None and pred_logits.shape[2] != dn.attn_mask.shape[0]:
            raise ValueError(
                f"the outputs have {pred_logits.shape[2]} queries, the denoising attention mask "
                f"was built for {dn.attn_mask.shape[0]}"
            )
        num_boxes = self._num_boxes(targets, pred_logits.device)

        losses = {}
        for suffix, logits, boxes in zip(self._layer_suffixes(), pred_logits, pred_boxes):
            logits, boxes = logits[:, num_dn:], boxes[:, num_dn:]
            indices = self.matcher(logits, boxes, targets)
            losses.update(self._set_losses(logits, boxes, targets, indices, num_boxes, suffix))

        enc_logits, enc_boxes = outputs["enc_logits"], outputs["enc_boxes"]
        indices = self.matcher(enc_logits, enc_boxes, targets)
        losses.update(self._set_losses(enc_logits, enc_boxes, targets, indices, num_boxes, "_enc"))

        for suffix, logits, boxes in zip(self._layer_suffixes(), pred_logits, pred_boxes):
            if dn is None:
                zero = pred_logits.new_zeros(())
                losses.update({name + "_dn" + suffix: zero for name in _LOSS_NAMES})
                continue
            logits, boxes = logits[:, :num_dn], boxes[:, :num_dn]
            losses.update(
                self._set_losses(
                    logits,
                    boxes,
                    targets,
                    dn.positive_indices,
                    num_boxes * dn.num_groups,
                    "_dn" + suffix,
                )
            )
        return {name: loss * self.weight_dict[name] for name, loss in losses.items()}

    @staticmethod
    def _num_boxes(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        count = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            world_size = dist.get_world_size()
        return torch.clamp(count / world_size, min=1).item()

    def _set_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_boxes: float,
        suffix: str,
    ) -> Dict[str, Tensor]:
        """Unweighted losses of one query set: logits (N, Q, K), boxes (N, Q, 4) cxcywh."""
        device = logits.device
        image_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(
            device
        )
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        matched_labels = torch.cat(
            [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
        ).to(device)
        matched_gt = torch.cat(
            [t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]
        ).to(device=device, dtype=boxes.dtype)

        onehot = torch.zeros_like(logits)
        onehot[image_idx, query_idx, matched_labels] = 1.0
        focal = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        loss_class = focal.mean(1).sum() / num_boxes * logits.shape[1]

        matched_boxes = boxes[image_idx, query_idx]
        loss_bbox = F.l1_loss(matched_boxes, matched_gt, reduction="none").sum() / num_boxes
        giou = torch.diag(
            generalized_box_iou(
                box_convert(matched_boxes, "cxcywh", "xyxy"),
                box_convert(matched_gt, "cxcywh", "xyxy"),
            )
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {
            "loss_class" + suffix: loss_class,
            "loss_bbox" + suffix: loss_bbox,
            "loss_giou" + suffix: loss_giou,
        }
