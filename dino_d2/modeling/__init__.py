"""The DINO detector: meta-architecture, backbones, neck, transformer, denoising and losses.

Importing this package registers ``DINO`` in Detectron2's ``META_ARCH_REGISTRY`` and the Swin
backbone in ``BACKBONE_REGISTRY``.
"""

from .backbone import SWIN_PRESETS, SwinBackbone, TimmBackbone
from .criterion import DINOCriterion
from .denoising import ContrastiveDenoising, DenoisingQueries
from .matcher import HungarianMatcher
from .meta_arch.dino import DINO
from .neck import ChannelMapper
from .transformer import (
    DeformableDecoder,
    DeformableEncoder,
    DINOTransformer,
    MixedQuerySelection,
)

__all__ = [
    "DINO",
    "ChannelMapper",
    "ContrastiveDenoising",
    "DenoisingQueries",
    "DINOCriterion",
    "DINOTransformer",
    "DeformableDecoder",
    "DeformableEncoder",
    "HungarianMatcher",
    "MixedQuerySelection",
    "SWIN_PRESETS",
    "SwinBackbone",
    "TimmBackbone",
]
