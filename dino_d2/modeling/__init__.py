"""The DINO detector: meta-architecture, backbones, neck, transformer, denoising and losses.

Importing this package registers ``DINO`` in Detectron2's ``META_ARCH_REGISTRY`` and the Swin
backbone in ``BACKBONE_REGISTRY``. The timm-based backbones (``SwinBackbone``, ``TimmBackbone``,
``SWIN_PRESETS``) are imported on first access: a ResNet model never imports timm.
"""

from ..utils.lazy import lazy_exports
from . import backbone  # noqa: F401  (registers the Swin builder)
from .criterion import DINOCriterion
from .denoising import ContrastiveDenoising, DenoisingQueries
from .losses import MatchedQueries, QuerySet
from .matcher import HungarianMatcher
from .meta_arch import DINO, DINODetections
from .neck import ChannelMapper
from .registry import LOSSES, MATCHING_COSTS
from .transformer import (
    DeformableDecoder,
    DeformableEncoder,
    DINOTransformer,
    DINOTransformerOutput,
    HeadOutputs,
    MixedQuerySelection,
    MultiScaleLevels,
)

__all__ = [
    "DINO",
    "DINODetections",
    "DINOTransformerOutput",
    "HeadOutputs",
    "LOSSES",
    "MATCHING_COSTS",
    "MatchedQueries",
    "MultiScaleLevels",
    "QuerySet",
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

__getattr__ = lazy_exports(
    __name__,
    {"SWIN_PRESETS": ".backbone", "SwinBackbone": ".backbone", "TimmBackbone": ".backbone"},
)
