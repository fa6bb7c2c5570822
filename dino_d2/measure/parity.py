"""The CPU fast path against the plain eager model: the same weights must give the same
detections.

The fast path is a transform of a built model
(:func:`dino_d2.layers.fast_path.optimize_for_cpu_inference`: folded frozen batch norms, a
channels-last backbone, oneDNN's linear layers with bias and ReLU fused).
:func:`fast_path_parity` applies it to a copy of a model and compares the two models'
detections as an export's are compared (:mod:`dino_d2.export.verify`); ``tools/benchmark.py``
reports it beside the timing.
"""

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d

from ..export.ties import forced_selection, recorded_selections, selection_tie_order
from ..export.verify import DetectionComparison, compare_detections
from ..layers.fast_path import optimized_copy

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


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 products and convolutions in full precision on CUDA, for the span of the block.

    cuDNN's convolutions round their inputs to TF32 (10-bit mantissa) by default on Ampere and
    newer: a folded batch norm then moves scores by about 1e-3, ten times the parity's
    tolerance, although the transform is exact. The previous settings are restored.
    """
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def _tie_order(plain, fast, tolerance: float):
    """(N, k) order that puts the plain run's selected proposals in the fast run's order, or
    None when no image's selection moved (see :func:`selection_tie_order`)."""
    orders, moved = [], False
    for boxes, logits, their_boxes in zip(plain.enc_boxes, plain.enc_logits, fast.enc_boxes):
        order = selection_tie_order(boxes, logits.amax(-1), their_boxes, tolerance)
        moved |= order is not None
        orders.append(torch.arange(len(boxes)) if order is None else order)
    return torch.stack(orders) if moved else None


def fast_path_parity(
    model: nn.Module,
    batch: List[Dict],
    *,
    score_tolerance: float = 1e-4,
    box_tolerance: float = 1e-2,
) -> DetectionComparison:
    """The fast path (a transformed copy of ``model``) against ``model`` itself, on ``batch``.

    Detections are paired as an export's are
    (:func:`dino_d2.export.verify.compare_detections`).

    Query selection is a top-k over the encoder's proposals: two proposals whose scores tie to a
    rounding error (common with random weights) may come out in either order, and query i pairs
    the i-th with the i-th learned content query, so a swap changes those queries' detections.
    When only tied proposals moved (:mod:`dino_d2.export.ties`), the plain model is run again
    with its selection in the fast one's order, and the swap is noted in the result.

    Args:
        model: a plain DINO (not transformed), in eval mode; it is not changed.
        batch: Detectron2 inputs (dicts with ``image``).
    """
    fast = optimized_copy(model)
    with torch.no_grad(), full_float32():
        with recorded_selections(fast) as fast_selections:
            outputs = fast(batch)
        with recorded_selections(model) as plain_selections:
            reference = model(batch)
        order = _tie_order(plain_selections[0], fast_selections[0], score_tolerance)
        if order is not None:
            with forced_selection(model, order):
                reference = model(batch)
    pairs = []
    for i, (ref, out) in enumerate(zip(reference, outputs)):
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
