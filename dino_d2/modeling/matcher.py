"""One-to-one Hungarian matching between predicted queries and ground-truth boxes.

The matching cost is a weighted sum of named cost terms. Each term is a function registered in
:data:`dino_d2.modeling.MATCHING_COSTS` that maps the predictions of M queries and G targets to
an (M, G) cost::

    from dino_d2.modeling import MATCHING_COSTS

    @MATCHING_COSTS.register()
    def cost_center(logits, boxes, labels, gt_boxes):   # (M, K), (M, 4), (G,), (G, 4)
        return torch.cdist(boxes[:, :2], gt_boxes[:, :2])

and the matcher's ``costs`` names the terms to use with their weights
(``model.criterion.matcher.costs.cost_center = 1.0`` in a LazyConfig). ``cost_options`` passes
keyword arguments to a term. Boxes are normalized cxcywh.

A term that needs more asks for it by parameter name, after the four above: a name of an extra
head's output gets the queries' values (M, ...) (e.g. ``pred_masks``), a name of a target field
gets the targets' values (G, ...) (e.g. ``gt_masks``, see ``DINO.prepare_targets``)::

    @MATCHING_COSTS.register()
    def cost_mask_area(logits, boxes, labels, gt_boxes, pred_masks, gt_masks):
        ...
"""

import inspect
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .registry import MATCHING_COSTS, lookup

__all__ = ["DEFAULT_COSTS", "HungarianMatcher", "cost_bbox", "cost_class", "cost_giou"]

# The DINO authors' matcher: L1 5, focal class cost 2, GIoU 2, summed in the authors' order.
DEFAULT_COSTS = {"cost_bbox": 5.0, "cost_class": 2.0, "cost_giou": 2.0}


@MATCHING_COSTS.register()
def cost_class(
    logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, *, alpha=0.25, gamma=2.0
) -> Tensor:
    """Focal cost of calling query q class ``labels[t]`` minus that of calling it background.

    ``alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))`` with
    ``p = sigmoid(logit)``, as the DINO authors' matcher computes it.
    """
    prob = logits.float().sigmoid()
    neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos_cost[:, labels] - neg_cost[:, labels]


@MATCHING_COSTS.register()
def cost_bbox(logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
    """L1 distance between the normalized cxcywh boxes."""
    return torch.cdist(boxes.float(), gt_boxes.float(), p=1)


@MATCHING_COSTS.register()
def cost_giou(logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
    """Negative GIoU of the xyxy corners (torchvision's GIoU, no eps in the enclosing area)."""
    return -generalized_box_iou(
        box_convert(boxes.float(), "cxcywh", "xyxy"),
        box_convert(gt_boxes.float(), "cxcywh", "xyxy"),
    )


def _requested_inputs(term, options: Mapping) -> List[str]:
    """The parameters of a cost term after its first four that are neither options nor have a
    default: the extra inputs it asks for by name."""
    parameters = list(inspect.signature(term).parameters.values())[4:]
    return [
        p.name
        for p in parameters
        if p.name not in options
        and p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth box of an image to a distinct query, minimizing a matching cost.

    The cost of query q for target t is ``sum_name costs[name] * term_name(q, t)`` over the
    registered terms of :data:`MATCHING_COSTS` named in ``costs``; with the defaults this is the
    DINO authors' ``5 * L1 + 2 * focal - 2 * GIoU``. The cost of the whole batch is computed at
    once; each image is then solved on its own with :func:`scipy.optimize.linear_sum_assignment`.
    Unmatched queries are background.

    Args:
        costs: cost term name -> weight; None gives :data:`DEFAULT_COSTS`.
        cost_options: optional keyword arguments per term, e.g.
            ``{"cost_class": {"alpha": 0.25, "gamma": 2.0}}``.
    """

    def __init__(
        self,
        *,
        costs: Optional[Mapping[str, float]] = None,
        cost_options: Optional[Mapping[str, Mapping]] = None,
    ):
        super().__init__()
        self.costs = dict(DEFAULT_COSTS if costs is None else costs)
        if not any(self.costs.values()):
            raise ValueError(f"at least one matching cost must be non-zero, got {self.costs}")
        self.cost_options = {name: dict(opts) for name, opts in (cost_options or {}).items()}
        self._terms = lookup(MATCHING_COSTS, self.costs, "matching cost")
        stray = sorted(set(self.cost_options) - set(self.costs))
        if stray:
            raise ValueError(f"cost_options for {stray}, which are not in costs {self.costs}")
        self._requests = {
            name: _requested_inputs(term, self.cost_options.get(name, {}))
            for name, term in self._terms.items()
        }

    @property
    def requested_inputs(self) -> List[str]:
        """The extra inputs (extra head outputs, target fields) the cost terms ask for."""
        return sorted({name for names in self._requests.values() for name in names})

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor,
        labels: Tensor,
        gt_boxes: Tensor,
        inputs: Optional[Mapping[str, Tensor]] = None,
    ) -> Tensor:
        """The (M, G) weighted matching cost.

        Args:
            logits: (M, K) class logits.
            boxes: (M, 4) predicted boxes, normalized cxcywh.
            labels: (G,) int64 target classes.
            gt_boxes: (G, 4) target boxes, normalized cxcywh.
            inputs: what the terms ask for by name: queries' extra outputs (M, ...) and
                targets' fields (G, ...).

        Returns:
            (M, G) float32 cost; lower is a better match.
        """
        inputs = inputs or {}
        total = None
        for name, weight in self.costs.items():
            if weight == 0:
                continue
            missing = [p for p in self._requests[name] if p not in inputs]
            if missing:
                raise ValueError(
                    f"matching cost '{name}' asks for {missing}, which neither the queries' extra "
                    f"outputs nor the targets' fields hold (they have {sorted(inputs)})"
                )
            options = dict(self.cost_options.get(name, {}))
            options.update({p: inputs[p] for p in self._requests[name]})
            term = weight * self._terms[name](logits, boxes, labels, gt_boxes, **options)
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: List[Dict[str, Tensor]],
        extras: Optional[Mapping[str, Tensor]] = None,
    ) -> List[Tuple[Tensor, Tensor]]:
        """Matches every image of the batch.

        Args:
            pred_logits: (N, Q, K) class logits.
            pred_boxes: (N, Q, 4) predicted boxes, normalized cxcywh.
            targets: N dicts with ``labels`` (G_i,) int64 and ``boxes`` (G_i, 4) normalized
                cxcywh, and any other fields (each (G_i, ...)).
            extras: the queries' extra head outputs by name, each (N, Q, ...).

        Returns:
            N pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length ``min(Q, G_i)``
            (empty for an image without targets): query ``query_idx[j]`` is matched to target
            ``target_idx[j]``; ``query_idx`` is sorted.
        """
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in sizes]
        n, q = pred_logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets]).to(pred_logits.device)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(pred_logits.device)
        inputs = {}
        for name in self.requested_inputs:
            if extras is not None and name in extras:
                inputs[name] = extras[name].flatten(0, 1)
            elif all(name in t for t in targets):
                inputs[name] = torch.cat([t[name] for t in targets]).to(pred_logits.device)
        cost = self.cost_matrix(
            pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), labels, gt_boxes, inputs
        )
        cost = cost.view(n, q, -1).cpu()
        # Imported here: scipy is a training-time need, and inference builds the matcher too.
        from scipy.optimize import linear_sum_assignment

        indices = []
        for image, block in enumerate(cost.split(sizes, -1)):
            if sizes[image] == 0:
                indices.append((empty, empty.clone()))
                continue
            query_idx, target_idx = linear_sum_assignment(block[image].numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices
