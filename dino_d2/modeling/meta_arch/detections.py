"""DINO's detections on tensors: padding masks, top-k without NMS, and their typed output.

:meth:`DINO.detect <dino_d2.modeling.DINO.detect>` returns a :class:`DINODetections`; forward
(Detectron2's ``Instances``), the export graph and the verifications all read it.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchvision.ops import box_convert

from detectron2.structures import Boxes, Instances

__all__ = [
    "DINODetections",
    "as_size_tensor",
    "gather_queries",
    "padding_masks",
    "select_top_detections",
]

Sizes = Union[Tensor, Sequence[Tuple[int, int]]]


@dataclass
class DINODetections:
    """The top-k detections of a batch, before Detectron2's ``detector_postprocess``.

    Attributes:
        boxes: (N, K, 4) absolute XYXY in each image's pixels (its real size, not the padding).
        scores: (N, K) sigmoid scores, descending within each image.
        classes: (N, K) int64 class of each detection.
        queries: (N, K) int64 decoder query each detection comes from.
        image_sizes: (N, 2) int64 real (height, width) of each image.
        extras: each extra head's output of the last decoder layer at each detection's query,
            by name: (N, K, ...).
    """

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    queries: Tensor
    image_sizes: Tensor
    extras: Dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def image(self, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Image ``i``'s ``(boxes (K, 4), scores (K,), classes (K,))``."""
        return self.boxes[i], self.scores[i], self.classes[i]

    def to_instances(self, image_sizes: Sequence[Tuple[int, int]]) -> List[Instances]:
        """One ``Instances`` per image with ``pred_boxes``, ``scores``, ``pred_classes`` and one
        field per extra output; ``image_sizes`` are the (h, w) to give them (ints, or 0-d
        tensors while tracing)."""
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            result.pred_boxes = Boxes(self.boxes[i])
            result.scores = self.scores[i]
            result.pred_classes = self.classes[i]
            for name, value in self.extras.items():
                result.set(name, value[i])
            results.append(result)
        return results


def as_size_tensor(sizes: Sizes, device: torch.device) -> Tensor:
    """(N, 2) int64 ``(h, w)``: from a tensor, or pairs of ints (or of 0-d tensors when the
    model is traced)."""
    if isinstance(sizes, Tensor):
        return sizes.to(device, torch.long)
    if sizes and isinstance(sizes[0][0], Tensor):
        return torch.stack([torch.stack(list(size)) for size in sizes]).to(device, torch.long)
    return torch.as_tensor(sizes, dtype=torch.long, device=device).view(-1, 2)


def padding_masks(
    features: Sequence[Tensor], strides: Sequence[int], image_sizes: Tensor
) -> List[Tensor]:
    """One padding mask per level, from each image's real size.

    Image i's valid region at stride s is its top-left ``ceil(h_i / s) x ceil(w_i / s)`` cells.

    Args:
        features: the levels, each (N, C, H_l, W_l).
        strides: the stride of each level.
        image_sizes: (N, 2) int64 ``(h, w)`` of each image before padding.

    Returns:
        list of (N, H_l, W_l) bool, True on padding.
    """
    masks = []
    for feature, stride in zip(features, strides):
        height, width = feature.shape[-2:]
        valid = torch.div(image_sizes + (stride - 1), stride, rounding_mode="floor")
        rows = torch.arange(height, device=feature.device)[None, :] >= valid[:, :1]
        cols = torch.arange(width, device=feature.device)[None, :] >= valid[:, 1:]
        masks.append(rows[:, :, None] | cols[:, None, :])
    return masks


def select_top_detections(
    logits: Tensor, boxes: Tensor, image_sizes: Tensor, num_select: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """DINO's detections: top-k over queries x classes of the sigmoid scores, no NMS.

    Args:
        logits: (N, Q, K) class logits of the last decoder layer.
        boxes: (N, Q, 4) normalized cxcywh boxes.
        image_sizes: (N, 2) int64 ``(h, w)`` each image's boxes are scaled to.
        num_select: k; fewer when ``Q * K`` is smaller.

    Returns:
        ``(boxes, scores, classes, queries)``: (N, k, 4) absolute XYXY, (N, k) scores in
        descending order, (N, k) int64 classes and (N, k) int64 query of each detection.
    """
    num_classes = logits.shape[-1]
    k = min(num_select, logits.shape[1] * num_classes)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    classes = index % num_classes
    queries = torch.div(index, num_classes, rounding_mode="floor")
    selected = torch.gather(boxes, 1, queries[..., None].expand(-1, -1, 4))
    scale = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]
    return box_convert(selected, "cxcywh", "xyxy") * scale, scores, classes, queries


def gather_queries(values: Tensor, queries: Tensor) -> Tensor:
    """``values[i, queries[i]]`` for every image: (N, Q, ...) and (N, K) give (N, K, ...)."""
    index = queries.view(*queries.shape, *[1] * (values.dim() - 2))
    return torch.gather(values, 1, index.expand(*queries.shape, *values.shape[2:]))
