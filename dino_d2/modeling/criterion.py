"""DINO's training criterion: matching, auxiliary, encoder-proposal and denoising losses.

The supervised query sets are the last decoder layer (keys ``loss_class``, ...), every earlier
decoder layer ``i`` (``loss_class_i``, ...), the selected encoder proposals (``loss_class_enc``,
...; the authors' "interm" loss, matched with the same matcher) and the denoising queries of every
decoder layer (``loss_class_dn``, ``loss_class_dn_i``, ...). The DN sets use the fixed assignment
of :class:`DenoisingQueries` instead of the matcher: positive queries take their box's class and
box targets, negative and padding queries are background for the class loss and take no box loss,
and ``num_boxes`` is multiplied by the number of DN groups. When there are no DN queries (``dn``
is None or holds none) the DN keys are still returned, as zeros, so the set of keys never changes.

Every set gets every loss term named in ``losses`` (terms registered in
:data:`dino_d2.modeling.LOSSES`, see :mod:`dino_d2.modeling.losses`), multiplied by that term's
weight; the per-set weights (all 1, as in the authors' configuration) and the keys follow from
``num_decoder_layers`` in code. ``num_boxes`` is the number of target boxes in the batch,
averaged over workers when torch.distributed is initialized, and clamped to at least 1.

Under autocast the matching and the losses run in float32 (autocast off; the class logits and
boxes of every set widened to float32): costs and focal terms summed over thousands of queries
need float32's precision, and the matcher compares costs across queries.
"""

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.precision import autocast_on
from .denoising import DenoisingQueries
from .losses import MatchedQueries, QuerySet
from .matcher import HungarianMatcher
from .registry import LOSSES, lookup
from .transformer import DINOTransformerOutput

__all__ = ["DEFAULT_LOSSES", "DINOCriterion"]

# The DINO authors' weights: focal class loss 1, L1 5, GIoU 2.
DEFAULT_LOSSES = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class DINOCriterion(nn.Module):
    """Computes DINO's weighted training losses from the transformer output.

    Args:
        num_classes: number of classes K (the last dim of the logits).
        matcher: the :class:`HungarianMatcher` used for the decoder layers and encoder proposals.
        num_decoder_layers: L, the number of decoder layers whose outputs are supervised.
        losses: loss term name -> weight, applied to every query set; None gives
            :data:`DEFAULT_LOSSES`.
        loss_options: optional keyword arguments per term, e.g.
            ``{"loss_class": {"alpha": 0.25, "gamma": 2.0}}``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        num_decoder_layers: int,
        losses: Optional[Mapping[str, float]] = None,
        loss_options: Optional[Mapping[str, Mapping]] = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.num_decoder_layers = num_decoder_layers
        self.losses = dict(DEFAULT_LOSSES if losses is None else losses)
        self.loss_options = {name: dict(opts) for name, opts in (loss_options or {}).items()}
        self._terms = lookup(LOSSES, self.losses, "loss")
        stray = sorted(set(self.loss_options) - set(self.losses))
        if stray:
            raise ValueError(f"loss_options for {stray}, which are not in losses {self.losses}")
        self.weight_dict = {
            name + suffix: weight
            for suffix in self._suffixes()
            for name, weight in self.losses.items()
        }

    def _layer_suffixes(self) -> List[str]:
        last = self.num_decoder_layers - 1
        return [f"_{i}" if i < last else "" for i in range(self.num_decoder_layers)]

    def _suffixes(self) -> List[str]:
        layers = self._layer_suffixes()
        return layers + ["_enc"] + ["_dn" + s for s in layers]

    def forward(
        self,
        outputs: DINOTransformerOutput,
        targets: List[Dict[str, Tensor]],
        dn: Optional[DenoisingQueries] = None,
    ) -> Dict[str, Tensor]:
        """Computes all losses of a batch.

        Args:
            outputs: the transformer's output; its decoder predictions hold the
                ``outputs.num_dn`` DN queries first (0 when ``dn`` is None).
            targets: N dicts with ``labels`` (G_i,) int64 in [0, K) and ``boxes`` (G_i, 4)
                normalized cxcywh, and any other ground-truth fields (``DINO.prepare_targets``)
                that extension losses and matching costs read.
            dn: the :class:`DenoisingQueries` the DN part was built from, or None.

        Returns:
            Scalar losses, already weighted, keyed as in ``self.weight_dict`` (a term that
            returns None for a set is left out); float32 under autocast.
        """
        if autocast_on(outputs.pred_logits):
            widened = {
                name: getattr(outputs, name).float()
                for name in ("pred_logits", "pred_boxes", "enc_logits", "enc_boxes")
            }
            # Extra heads' outputs too (a mask head's logits): every loss term and matching
            # cost sees float32.
            for name in ("extras", "enc_extras"):
                widened[name] = {
                    key: value.float() if value.is_floating_point() else value
                    for key, value in getattr(outputs, name).items()
                }
            with torch.autocast(outputs.pred_logits.device.type, enabled=False):
                return self._losses(dataclasses.replace(outputs, **widened), targets, dn)
        return self._losses(outputs, targets, dn)

    def _losses(
        self,
        outputs: DINOTransformerOutput,
        targets: List[Dict[str, Tensor]],
        dn: Optional[DenoisingQueries],
    ) -> Dict[str, Tensor]:
        pred_logits, pred_boxes = outputs.pred_logits, outputs.pred_boxes
        if pred_logits.shape[0] != self.num_decoder_layers:
            raise ValueError(
                f"expected outputs of {self.num_decoder_layers} decoder layers, "
                f"got {pred_logits.shape[0]}"
            )
        if pred_logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {pred_logits.shape[-1]}")
        num_dn = 0 if dn is None else dn.num_dn_queries
        if num_dn != outputs.num_dn:
            raise ValueError(
                f"the outputs hold {outputs.num_dn} denoising queries, the denoising part was "
                f"built with {num_dn}"
            )
        num_boxes = self._num_boxes(targets, pred_logits.device)
        matching, dn_part = slice(num_dn, None), slice(0, num_dn)

        losses = {}
        for layer, suffix in enumerate(self._layer_suffixes()):
            queries = QuerySet(
                suffix,
                pred_logits[layer, :, matching],
                pred_boxes[layer, :, matching],
                layer,
                matching,
                outputs,
            )
            indices = self.matcher(queries.logits, queries.boxes, targets, queries.extras())
            losses.update(self._set_losses(queries, targets, indices, num_boxes))

        queries = QuerySet("_enc", outputs.enc_logits, outputs.enc_boxes, None, None, outputs)
        indices = self.matcher(queries.logits, queries.boxes, targets, queries.extras())
        losses.update(self._set_losses(queries, targets, indices, num_boxes))

        for layer, suffix in enumerate(self._layer_suffixes()):
            if num_dn == 0:
                zero = pred_logits.new_zeros(())
                losses.update({name + "_dn" + suffix: zero for name in self.losses})
                continue
            queries = QuerySet(
                "_dn" + suffix,
                pred_logits[layer, :, dn_part],
                pred_boxes[layer, :, dn_part],
                layer,
                dn_part,
                outputs,
            )
            losses.update(
                self._set_losses(queries, targets, dn.positive_indices, num_boxes * dn.num_groups)
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
        queries: QuerySet,
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> Dict[str, Tensor]:
        """Unweighted losses of one query set, keyed ``<term><suffix>``."""
        matched = MatchedQueries(queries, targets, indices, num_boxes)
        losses = {}
        for name, term in self._terms.items():
            value = term(matched, **self.loss_options.get(name, {}))
            if value is not None:
                losses[name + queries.suffix] = value
        return losses
