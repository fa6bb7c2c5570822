"""DINO's whole inference as one exportable graph: a padded image batch in, detections out.

:class:`InferenceGraph` is a thin adapter around a built :class:`~dino_d2.modeling.DINO` (it
shares its weights), as Detectron2's ``TracingAdapter`` wraps a model's own inference: its
forward is :meth:`DINO.detect <dino_d2.modeling.DINO.detect>` with tensors in and a flat tuple
of tensors out::

    boxes, scores, classes, *extras = InferenceGraph(model)(images, image_sizes)

* ``images``: (N, 3, H, W) uint8 (or float, see ``input_dtype``), 0-255 values in the model's
  ``input_format`` channel order; image i fills the top-left ``image_sizes[i]`` of its slot, the
  rest is padding whose values do not matter.
* ``image_sizes``: (N, 2) int64, each image's real (height, width).
* ``boxes`` (N, K, 4) absolute XYXY in each image's pixels, ``scores`` (N, K) in descending order
  and ``classes`` (N, K) int64: the top-k of ``detect`` (K = ``num_select``, or fewer when
  queries x classes is smaller), before Detectron2's ``detector_postprocess`` (which rescales to
  a requested output size and clips); then every extra head's output at the detections, (N, K,
  ...), in the order of their names (:meth:`InferenceGraph.output_names`).

Everything ``detect`` does is inside the graph (normalization, padding, masks, backbone, neck,
encoder, query selection, decoder, extra heads, top-k); no Detectron2 structure crosses its
boundary, and N, H and W can be dynamic. The batch goes through the backbone as one tensor
(``exact_batched=False``); a single image gives exactly DINO's own detections.
"""

from typing import List, Tuple

import torch
from torch import Tensor, nn

from dino_d2.modeling.meta_arch.dino import DINO

__all__ = ["InferenceGraph"]

_INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
_DETECTIONS = ("boxes", "scores", "classes")


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
        square = (model.backbone.padding_constraints or {}).get("square_size", 0)
        if square > 0:
            raise ValueError(
                f"{type(model.backbone).__name__}: padding_constraints asks for square padding "
                f"to {square}, which the exported graph does not do; use a backbone without "
                "square_size"
            )
        self.model = model
        self.input_dtype = input_dtype
        # An inference graph: the wrapper and the model in eval mode (the exporters check it).
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the image input."""
        return _INPUT_DTYPES[self.input_dtype]

    @torch.no_grad()
    def output_names(self, images: Tensor, image_sizes: Tensor) -> List[str]:
        """The names of :meth:`forward`'s outputs: the detections', then the extra heads' (which
        only a run tells), for the inputs given."""
        extras = self.model.detect(images, image_sizes, exact_batched=False).extras
        return [*_DETECTIONS, *sorted(extras)]

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, ...]:
        """Detects objects in a padded batch.

        Args:
            images: (N, 3, H, W) ``self.dtype``, 0-255 values in the model's input format.
            image_sizes: (N, 2) int64 real (height, width) of each image.

        Returns:
            ``(boxes, scores, classes, *extras)``: (N, K, 4) absolute XYXY, (N, K), (N, K)
            int64, then each extra head's (N, K, ...) output in the order of its name.
        """
        detections = self.model.detect(images, image_sizes, exact_batched=False)
        extras = detections.extras
        return (
            detections.boxes,
            detections.scores,
            detections.classes,
            *(extras[name] for name in sorted(extras)),
        )
