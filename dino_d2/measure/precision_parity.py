"""Detections of a model under autocast against the same model in float32.

Both runs use the CPU fast path (:func:`dino_d2.layers.fast_path.optimized_copy`, which holds
under bfloat16 autocast); detections are paired as an export's are
(:func:`dino_d2.export.verify.compare_detections`) and the comparison reports the largest score
and box differences. With random weights many encoder proposals tie in score, so the top-k query
selection (and with it whole detections) may differ for reasons that are not the precision's:
compare trained weights for an accuracy statement.

Command line (prints the comparison as JSON)::

    python -m dino_d2.measure.precision_parity --config configs/dino_r50_4scale_12ep.py \\
        [--weights model.pth] [--height 800 --width 1333]
"""

import argparse
import json
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..export.verify import DetectionComparison, compare_detections
from ..layers.fast_path import optimized_copy

__all__ = ["autocast_parity"]


def _detections(model: nn.Module, batch: List[Dict], dtype: Optional[torch.dtype]):
    device_type = batch[0]["image"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        outputs = model(batch)
    return [
        (
            out["instances"].pred_boxes.tensor.float(),
            out["instances"].scores.float(),
            out["instances"].pred_classes,
        )
        for out in outputs
    ]


def autocast_parity(
    model: nn.Module,
    batch: List[Dict],
    dtype: Optional[torch.dtype] = torch.bfloat16,
    *,
    score_tolerance: float = 1e-2,
    box_tolerance: float = 1.0,
) -> DetectionComparison:
    """The fast path of ``model`` under autocast to ``dtype`` against it in float32.

    Args:
        model: a DINO in eval mode; it is not changed (a transformed copy runs).
        batch: Detectron2 inputs (dicts with ``image``).
        dtype: the autocast dtype; None runs float32 twice (the comparison then shows zeros).
        score_tolerance, box_tolerance: what :class:`DetectionComparison` counts as passing
            (box differences in pixels).
    """
    fast = optimized_copy(model)
    reference = _detections(fast, batch, None)
    candidate = _detections(fast, batch, dtype)
    pairs = [(ref, out, f"image {i}") for i, (ref, out) in enumerate(zip(reference, candidate))]
    return compare_detections(pairs, score_tolerance=score_tolerance, box_tolerance=box_tolerance)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    from detectron2.config import instantiate

    from ..checkpoint import AtomicCheckpointer
    from .parity import perturb_frozen_batchnorm
    from ..model_zoo import load_config_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a model config")
    parser.add_argument("--weights", help="a checkpoint (default: random weights)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--images", type=int, default=1, help="random images to compare on")
    args = parser.parse_args(argv)
    model = instantiate(load_config_file(args.config).model).eval()
    if args.weights:
        AtomicCheckpointer(model).load(args.weights)
    else:
        # Freshly built frozen batch norms are the identity: give them statistics.
        perturb_frozen_batchnorm(model)
    generator = torch.Generator().manual_seed(0)
    batch = [
        {"image": torch.randint(256, (3, args.height, args.width), generator=generator).float()}
        for _ in range(args.images)
    ]
    comparison = autocast_parity(model, batch)
    result = {
        "summary": comparison.summary(),
        "max_score_diff": comparison.max_score_diff,
        "max_box_diff_px": comparison.max_box_diff,
        "passed": comparison.passed,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
