"""DINO's whole inference as one exportable graph: a padded image batch in, detections out.

:class:`InferenceGraph` wraps a built :class:`~dino_d2.modeling.DINO` (it shares its weights)::

    boxes, scores, classes = InferenceGraph(model)(images, image_sizes)

* ``images``: (N, 3, H, W) uint8 (or float, see ``input_dtype``), 0-255 values in the model's
  ``input_format`` channel order; image i fills the top-left ``image_sizes[i]`` of its slot, the
  rest is padding whose values do not matter.
* ``image_sizes``: (N, 2) int64, each image's real (height, width).
* ``boxes`` (N, K, 4) absolute XYXY in each image's pixels, ``scores`` (N, K) in descending order
  and ``classes`` (N, K) int64: exactly :meth:`DINO.inference`'s top-k (K = ``num_select``, or
  fewer when queries x classes is smaller), before Detectron2's ``detector_postprocess`` (which
  rescales to a requested output size and clips).

Normalization, the zero padding of the normalized image (what :meth:`DINO.preprocess_image`
gives), the padding to the backbone's ``size_divisibility``, the padding masks, the backbone,
the neck, the encoder, query selection, the decoder and top-k are all inside the graph; no
Detectron2 structure crosses its boundary, and N, H and W can be dynamic.

The batch goes through the backbone as one tensor, as DINO does with
``exact_batched_inference=False``; a single image gives exactly DINO's own detections.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_d2.modeling.meta_arch.dino import DINO, padding_masks, select_top_detections

__all__ = ["InferenceGraph"]

_INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


class InferenceGraph(nn.Module):
    """Exportable inference of a DINO (see the module docstring).

    Args:
        model: a built DINO in eval mode; its weights are shared, not copied.
        input_dtype: ``"uint8"`` or ``"float32"``, the dtype the graph's image input has.
    """

    def __init__(self, model: DINO, *, input_dtype: str = "uint8"):
        super().__init__()
        if not isinstance(model, DINO):
            raise TypeError(f"InferenceGraph wraps a dino_d2 DINO, got {type(model).__name__}")
        if input_dtype not in _INPUT_DTYPES:
            raise ValueError(
                f"input_dtype must be one of {list(_INPUT_DTYPES)}, got {input_dtype!r}"
            )
        square = model.backbone.padding_constraints.get("square_size", 0)
        if square > 0:
            raise ValueError(
                f"{type(model.backbone).__name__}: padding_constraints asks for square padding "
                f"to {square}, which the exported graph does not do; use a backbone without "
                "square_size"
            )
        self.model = model.eval()
        self.input_dtype = input_dtype
        self.size_divisibility = int(model.backbone.size_divisibility or 0)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the image input."""
        return _INPUT_DTYPES[self.input_dtype]

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Detects objects in a padded batch.

        Args:
            images: (N, 3, H, W) ``self.dtype``, 0-255 values in the model's input format.
            image_sizes: (N, 2) int64 real (height, width) of each image.

        Returns:
            ``(boxes, scores, classes)``: (N, K, 4) absolute XYXY, (N, K), (N, K) int64.
        """
        model = self.model
        height, width = images.shape[-2:]
        x = (images.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        rows = torch.arange(height, device=x.device)[None, :] < image_sizes[:, :1]
        cols = torch.arange(width, device=x.device)[None, :] < image_sizes[:, 1:]
        x = x * (rows[:, :, None] & cols[:, None, :])[:, None].to(x.dtype)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            x = F.pad(x, (0, (d - width % d) % d, 0, (d - height % d) % d))
        levels = model.run_backbone(x)
        features = [levels[name] for name in model._levels]
        masks = padding_masks(features, model._strides, image_sizes)
        outputs = model.transformer(features, masks)
        boxes, scores, classes, _ = select_top_detections(
            outputs.pred_logits[-1], outputs.pred_boxes[-1], image_sizes, model.num_select
        )
        return boxes, scores, classes
