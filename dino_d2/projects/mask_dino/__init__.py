"""Mask DINO (Li et al., CVPR 2023): instance segmentation from DINO's decoder, as an extension.

Importing this package registers the mask loss terms (``loss_mask``, ``loss_dice``), the mask
matching cost (``cost_mask``) and the ``MaskDINO`` meta-architecture. The parts:

* :class:`MaskPixelDecoder`: the encoder memory's finest level fused FPN-style with the
  backbone's stride-4 map into the mask features;
* :class:`MaskHead`: per-query mask embeddings, dotted with the mask features, for every decoder
  layer (denoising queries included) and the encoder proposals;
* :class:`MaskDINO`: DINO whose inference pastes the masks (``pred_masks``) and rescores.
"""

from .costs import cost_mask
from .losses import loss_dice, loss_mask
from .mask_head import MaskHead
from .meta_arch import MaskDINO
from .pixel_decoder import MaskPixelDecoder

__all__ = ["MaskDINO", "MaskHead", "MaskPixelDecoder", "cost_mask", "loss_dice", "loss_mask"]
