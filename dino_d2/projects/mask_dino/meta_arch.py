"""The Mask DINO meta-architecture: DINO whose instances carry their pasted masks."""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Instances

from dino_d2.modeling import DINO, DINOTransformerOutput, MultiScaleLevels
from dino_d2.modeling.transformer.query_selection import SelectedQueries

from .mask_anchors import MASK_BOX_INITS, mask_anchors

__all__ = ["MaskDINO", "paste_mask_logits"]

MASKS = "mask_logits"


def paste_mask_logits(logits: Tensor, stride: int, image_size: tuple, output_size: tuple) -> Tensor:
    """Mask logits of the padded frame at ``stride`` to logits at the output size, as Mask DINO
    post-processes them: bilinear upsampling by ``stride`` to the padded frame, the image's
    top-left ``image_size`` cropped, bilinear resizing to ``output_size``.

    Args:
        logits: (K, H_s, W_s) mask logits of one image.
        stride: the mask features' stride.
        image_size: the image's real (h, w).
        output_size: (height, width) the detections are reported at.

    Returns:
        (K, height, width) logits.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *output_size))
    h, w = image_size
    full = F.interpolate(logits[None], scale_factor=stride, mode="bilinear", align_corners=False)
    cropped = full[..., :h, :w]
    return F.interpolate(cropped, size=tuple(output_size), mode="bilinear", align_corners=False)[0]


@META_ARCH_REGISTRY.register()
class MaskDINO(DINO):
    """DINO with a mask head (``heads["masks"]``, a :class:`MaskHead`) whose inference gives
    instance masks.

    Inference: DINO's top-k detections (``num_select`` over queries x classes), each with its
    query's mask logits pasted at the output size (:func:`paste_mask_logits`); ``pred_masks``
    (K, height, width) bool is ``logit > 0`` (probability > 0.5), and ``scores`` are Mask DINO's:
    the class score times the mask score, the mean mask probability inside ``pred_masks``.
    Training is DINO's, with the mask terms in the criterion.

    What differs from DINO, as the authors build it:

    * mask-enhanced anchors (``mask_box_init``): before decoding, the selected proposals' masks
      are predicted and their boxes replace the proposals' regressed anchors
      (:func:`mask_anchors`); the mask features computed for that are reused by the head;
    * the decoder's content queries are the selected proposals' states, detached
      (``content_from_proposals``, the authors' ``LEARN_TGT: False``); the query selection's
      learned content embedding is then unused and frozen;
    * one ``decoder_norm``: the mask head's ``norm`` is the decoder's final norm (one module),
      and the class logits are computed on the states normed once more by it
      (``class_on_normed_states``; the authors' ``forward_prediction_heads`` norms the
      decoder's already normed output before the class and mask heads alike).

    Args:
        mask_stride: stride of the mask head's logits (the pixel decoder's backbone map).
        mask_box_init: "mask2box" or "bitmask" (the authors' two box conversions), or None for
            DINO's anchors.
        content_from_proposals: see above; False keeps DINO's learned content queries.
        class_on_normed_states: see above; False keeps DINO's class logits.
        **kwargs: as :class:`DINO`; ``heads["masks"]`` must be a :class:`MaskHead`.
    """

    def __init__(
        self,
        *,
        mask_stride: int = 4,
        mask_box_init: Optional[str] = "mask2box",
        content_from_proposals: bool = True,
        class_on_normed_states: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mask_box_init is not None and mask_box_init not in MASK_BOX_INITS:
            raise ValueError(
                f"MaskDINO: mask_box_init must be one of {MASK_BOX_INITS} or None, got "
                f"{mask_box_init!r}"
            )
        if "masks" not in self.heads:
            raise ValueError(
                f"MaskDINO needs a mask head as heads['masks'], got heads {sorted(self.heads)}"
            )
        self.mask_stride = mask_stride
        self.mask_box_init = mask_box_init
        self.content_from_proposals = content_from_proposals
        self.class_on_normed_states = class_on_normed_states
        self.heads["masks"].norm = self.transformer.decoder.norm
        if content_from_proposals:
            self.transformer.query_selection.tgt_embed.requires_grad_(False)

    def refine_queries(
        self,
        selected: SelectedQueries,
        memory: Tensor,
        levels: MultiScaleLevels,
        *,
        features: Dict[str, Tensor],
    ) -> SelectedQueries:
        """The proposals' states as content and the boxes of their predicted masks as anchors
        (see the class docstring)."""
        if self.content_from_proposals:
            selected = dataclasses.replace(selected, content=selected.enc_states.detach())
        if self.mask_box_init is None:
            return selected
        head = self.heads["masks"]
        # The mask features keep their gradient (the head reuses them); the boxes do not.
        mask_features = head.mask_features(memory, levels, features)
        with torch.no_grad():
            logits = head.predict(selected.enc_states, mask_features)
        anchors = mask_anchors(
            logits,
            selected.anchors,
            levels.valid_ratios[:, 0],
            self.mask_box_init,
            eps=self.transformer.decoder.box_logit_eps,
        )
        return dataclasses.replace(selected, anchors=anchors)

    def run_heads(self, outputs: DINOTransformerOutput) -> None:
        """The class logits on the states normed again (``class_on_normed_states``; only the
        last layer's in inference, the only one it reads), then every head."""
        if self.class_on_normed_states:
            decoder = self.transformer.decoder
            states = outputs.hidden_states
            first = 0 if self.training else len(states) - 1
            logits = [
                decoder.class_embed[layer](decoder.norm(states[layer]))
                for layer in range(first, len(states))
            ]
            outputs.pred_logits = torch.cat([outputs.pred_logits[:first], torch.stack(logits)])
        super().run_heads(outputs)

    def postprocess(
        self, results: List[Instances], output_sizes: Optional[Sequence[Tuple[int, int]]]
    ) -> List:
        """As :meth:`DINO.postprocess`, with ``pred_masks`` and mask-rescored ``scores`` (see the
        class docstring); without ``output_sizes`` the masks are at each image's own size."""
        processed = []
        for index, result in enumerate(results):
            size = result.image_size if output_sizes is None else tuple(output_sizes[index])
            result = self._with_masks(result, size)
            if output_sizes is not None:
                result = detector_postprocess(result, *size)
            masks = result.get(MASKS)
            result.remove(MASKS)
            result.pred_masks = masks > 0
            processed.append(result if output_sizes is None else {"instances": result})
        return processed

    def _with_masks(self, result: Instances, size: tuple) -> Instances:
        """``mask_logits`` pasted at ``size`` and the scores multiplied by the mask scores."""
        logits = paste_mask_logits(result.get(MASKS), self.mask_stride, result.image_size, size)
        masks = (logits > 0).to(logits.dtype)
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (
            masks.flatten(1).sum(1) + 1e-6
        )
        result.set(MASKS, logits)
        result.scores = result.scores * mask_scores
        return result
