"""The CPU fast path against the plain eager model: the same weights must give the same
detections.

DINO runs inference on the CPU with its frozen batch norms folded into their convolutions, a
channels-last backbone and oneDNN's linear layers with bias and ReLU fused
(:mod:`dino_d2.layers.frozen_bn`, :mod:`dino_d2.layers.linear`). :func:`fast_path_parity`
builds the same config without them and compares the detections as an export's are compared
(:mod:`dino_d2.export.verify`); ``tools/benchmark.py`` reports it beside the timing.
"""

import copy
import dataclasses
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from detectron2.config import instantiate
from detectron2.layers import FrozenBatchNorm2d

from ..export.verify import DetectionComparison, compare_detections
from ..layers.linear import onednn_linear

__all__ = ["fast_path_parity", "perturb_frozen_batchnorm"]


def perturb_frozen_batchnorm(model: nn.Module, seed: int = 0) -> int:
    """Gives every ``FrozenBatchNorm2d`` of ``model`` random statistics and affine parameters.

    Freshly built, they are the identity map, so folding them into their convolutions would
    change nothing; with these values a comparison of the folded and unfolded model means
    something. Returns the number of layers changed.
    """
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.weight.numel()
            values = {
                "weight": 0.5 + torch.rand(n, generator=generator),
                "bias": 0.1 * torch.randn(n, generator=generator),
                "running_mean": 0.1 * torch.randn(n, generator=generator),
                "running_var": 0.5 + torch.rand(n, generator=generator),
            }
            for name, value in values.items():
                getattr(module, name).copy_(value)
            changed += 1
    return changed


def _tie_order(fast, plain, tolerance: float) -> Optional[Tensor]:
    """The order that puts the plain model's selected encoder proposals in the fast model's
    order, per image, when both selections hold the same proposals and the ones that moved score
    alike within ``tolerance``; None when they already agree or differ otherwise."""
    if fast.indices.shape != plain.indices.shape:
        return None
    orders = []
    for ours, theirs, scores in zip(fast.indices, plain.indices, plain.enc_logits.amax(-1)):
        position = {int(token): i for i, token in enumerate(theirs)}
        if set(position) != set(ours.tolist()):
            return None
        order = torch.tensor([position[int(token)] for token in ours])
        if (scores[order] - scores).abs().max() > tolerance:
            return None
        orders.append(order)
    order = torch.stack(orders)
    return None if torch.equal(order, torch.arange(order.shape[1]).expand_as(order)) else order


def fast_path_parity(
    cfg, model, batch: List[Dict], *, score_tolerance: float = 1e-4, box_tolerance: float = 1e-2
) -> DetectionComparison:
    """The model as built (the fast path: folded batch norms, channels-last backbone, oneDNN's
    fused linears) against the same weights in the plain eager model, on ``batch``.

    The plain model is ``cfg.model`` with ``fuse_frozen_batchnorm=False`` and
    ``channels_last=False``, loaded with ``model``'s state dict and run with
    ``onednn_linear(False)``. Detections are paired as an export's are
    (:func:`dino_d2.export.verify.compare_detections`).

    Query selection is a top-k over the encoder's proposals: two proposals whose scores tie to a
    rounding error (common with random weights) may come out in either order, and query i pairs
    the i-th with the i-th learned content query, so a swap changes those queries' detections.
    When the two selections hold the same proposals and only tied ones moved, the plain model is
    run again with its selection in the fast one's order, and the swap is noted in the result.
    """
    plain_cfg = copy.deepcopy(cfg.model)
    plain_cfg.fuse_frozen_batchnorm = False
    plain_cfg.channels_last = False
    plain = instantiate(plain_cfg)
    plain.load_state_dict(model.state_dict())
    plain.to(next(model.parameters()).device).eval()
    selections = {}

    def capture(name):
        def hook(module, inputs, output):
            selections[name] = output

        return hook

    def reorder(module, inputs, output):
        index = order.to(output.indices.device)

        def take(t):
            return torch.gather(t, 1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand_as(t))

        return dataclasses.replace(
            output,
            anchors=take(output.anchors),
            enc_logits=take(output.enc_logits),
            enc_boxes=take(output.enc_boxes),
            indices=take(output.indices),
        )

    handles = [
        model.transformer.query_selection.register_forward_hook(capture("fast")),
        plain.transformer.query_selection.register_forward_hook(capture("plain")),
    ]
    try:
        with torch.no_grad():
            fast = model(batch)
            with onednn_linear(False):
                reference = plain(batch)
                order = _tie_order(selections["fast"], selections["plain"], score_tolerance)
                if order is not None:
                    handles.append(plain.transformer.query_selection.register_forward_hook(reorder))
                    reference = plain(batch)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for i, (ref, out) in enumerate(zip(reference, fast)):
        ref, out = ref["instances"], out["instances"]
        pairs.append(
            (
                (ref.pred_boxes.tensor, ref.scores, ref.pred_classes),
                (out.pred_boxes.tensor, out.scores, out.pred_classes),
                f"image {i}",
            )
        )
    comparison = compare_detections(
        pairs, score_tolerance=score_tolerance, box_tolerance=box_tolerance
    )
    if order is not None:
        moved = int((order != torch.arange(order.shape[1])).sum())
        comparison.notes.append(
            f"{moved} selected encoder proposals tie in score with another and came out of "
            "top-k in another order; the plain model re-run in the fast path's order"
        )
    return comparison
