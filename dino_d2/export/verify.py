"""Proof of an export: the exported graph's detections against the PyTorch model's own.

The reference is DINO's own inference on tensors, :meth:`DINO.detect
<dino_d2.modeling.DINO.detect>` with ``exact_batched=False`` (the graph sends the padded batch
through the backbone as one tensor; for a single image both are the same), which the graph also
calls.

Detections are compared as sets, not rank by rank (:func:`dino_d2.export.ties.pair_detections`):
two detections whose scores differ by less than the tolerance may come out of top-k in either
order, and the one at the top-k cut may be a different one. Detections are paired within each
class, scores within ``score_tolerance`` and boxes within ``box_tolerance``, as many pairs as
possible (an assignment, closest boxes first); the differences of the pairs are reported and
every detection must be paired except ties at the cut.

Extra outputs that are maps per detection (a mask head's (K, h, w) logits) are compared on the
pairs by the IoU of ``logit > 0``: at least ``mask_iou_tolerance`` for every paired detection
(empty on both sides counts as equal).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from dino_d2.modeling.meta_arch.dino import DINO

from .ties import Detections, pair_detections, unpaired_beyond_cut

__all__ = [
    "DetectionComparison",
    "compare_detections",
    "eager_detections",
    "pad_images",
    "verification_batches",
]


@dataclass
class DetectionComparison:
    """The differences between two runs' detections over several images."""

    score_tolerance: float
    box_tolerance: float
    mask_iou_tolerance: float = 0.99
    num_detections: int = 0
    num_paired: int = 0
    max_score_diff: float = 0.0
    max_box_diff: float = 0.0
    num_masks: int = 0
    min_mask_iou: float = 1.0
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.num_paired > 0

    def add(self, reference: Detections, candidate: Detections, what: str) -> None:
        """Compares one image's detections (absolute XYXY boxes, scores, classes)."""
        reference = tuple(torch.as_tensor(t).detach().float().cpu() for t in reference)
        candidate = tuple(torch.as_tensor(t).detach().float().cpu() for t in candidate)
        if reference[1].shape != candidate[1].shape:
            self.problems.append(
                f"{what}: {len(candidate[1])} detections instead of {len(reference[1])}"
            )
            return
        pairs = []
        scores, boxes, unpaired, theirs = pair_detections(
            candidate, reference, self.score_tolerance, self.box_tolerance, pairs
        )
        self._compare_masks(reference, candidate, pairs, what)
        self.num_detections += len(reference[1])
        self.num_paired += len(scores)
        self.max_score_diff = max([self.max_score_diff, *scores])
        self.max_box_diff = max([self.max_box_diff, *boxes])
        # Only a tie at the top-k cut may leave a detection unpaired.
        cut = min(float(reference[1].min()), float(candidate[1].min()))
        bad = unpaired_beyond_cut(unpaired + theirs, cut, self.score_tolerance)
        if bad:
            self.problems.append(f"{what}: detections without a counterpart {bad[:3]}")

    def _compare_masks(
        self, reference: tuple, candidate: tuple, pairs: List[Tuple[int, int]], what: str
    ) -> None:
        """IoU of ``logit > 0`` of every per-detection map output, on the paired detections."""
        for ours, theirs in zip(candidate[3:], reference[3:]):
            if ours.dim() < 3 or not pairs:
                continue
            index = torch.tensor(pairs)
            mine, other = ours[index[:, 0]] > 0, theirs[index[:, 1]] > 0
            union = (mine | other).flatten(1).sum(1)
            iou = torch.where(union > 0, (mine & other).flatten(1).sum(1) / union.clamp(min=1), 1.0)
            self.num_masks += len(iou)
            self.min_mask_iou = min(self.min_mask_iou, float(iou.min()))
            low = int((iou < self.mask_iou_tolerance).sum())
            if low:
                self.problems.append(
                    f"{what}: {low} mask(s) with IoU below {self.mask_iou_tolerance:g} "
                    f"(lowest {float(iou.min()):.4f})"
                )

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        masks = (
            f", min mask IoU {self.min_mask_iou:.4f} over {self.num_masks} masks "
            f"(>= {self.mask_iou_tolerance:g})"
            if self.num_masks
            else ""
        )
        line = (
            f"{self.num_paired} of {self.num_detections} detections paired, max |score diff| "
            f"{self.max_score_diff:.2e} (<= {self.score_tolerance:g}), max |box diff| "
            f"{self.max_box_diff:.2e} px (<= {self.box_tolerance:g}){masks}: {verdict}"
        )
        return "\n".join([line, *(f"  {p}" for p in self.problems + self.notes)])


def compare_detections(
    pairs: Sequence[Tuple[Detections, Detections, str]],
    *,
    score_tolerance: float = 1e-4,
    box_tolerance: float = 1e-2,
) -> DetectionComparison:
    """Compares ``(reference, candidate, label)`` triples of per-image detections."""
    comparison = DetectionComparison(score_tolerance, box_tolerance)
    for reference, candidate, what in pairs:
        comparison.add(reference, candidate, what)
    return comparison


@torch.no_grad()
def eager_detections(model: DINO, images: Tensor, image_sizes: Tensor) -> List[Detections]:
    """DINO's own top-k detections of a padded batch, as an exported graph computes them: one
    ``(boxes, scores, classes, *extras)`` per image (extra outputs in the graph's order).

    Args:
        model: the DINO in eval mode.
        images: (N, 3, H, W) 0-255 images in the model's input format, image i in the top-left
            ``image_sizes[i]`` of its slot.
        image_sizes: (N, 2) int64 (height, width).
    """
    detections = model.detect(images, image_sizes, exact_batched=False)
    extras = [detections.extras[name] for name in sorted(detections.extras)]
    return [(*detections.image(i), *(e[i] for e in extras)) for i in range(len(detections))]


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(images, image_sizes)`` as an exported graph takes them: (N, 3, max H, max W) of the
    images' dtype, each image in the top-left corner of its slot and zeros elsewhere, and the
    (N, 2) int64 real sizes."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    padded = images[0].new_zeros(
        (len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    )
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    return padded, torch.tensor(sizes, dtype=torch.int64)


def verification_batches(
    make_image: Callable[[int, int], Tensor], sizes: Sequence[Sequence[Tuple[int, int]]]
) -> List[Tuple[Tensor, Tensor]]:
    """Padded batches of new images: one ``(images, image_sizes)`` per entry of ``sizes``.

    Args:
        make_image: ``(height, width) -> (3, height, width)`` image of the graph's dtype.
        sizes: for each batch, the (height, width) of its images.
    """
    return [pad_images([make_image(h, w) for h, w in batch_sizes]) for batch_sizes in sizes]


def detections_of_outputs(outputs: Sequence, image_sizes: Tensor) -> List[Detections]:
    """Per-image ``(boxes, scores, classes, *extras)`` of a graph's (N, K, ...) outputs."""
    outputs = [torch.as_tensor(o) for o in outputs]
    return [tuple(o[i] for o in outputs) for i in range(len(image_sizes))]


def report_rows(results: Dict[str, DetectionComparison]) -> List[str]:
    """One line per compared runtime."""
    return [f"{name}: {comparison.summary()}" for name, comparison in results.items()]
