"""Backbones: Swin Transformer (on timm), any timm ``features_only`` network, and ViTDet's simple
feature pyramid over a single-scale backbone such as a plain ViT.

Importing this package registers ``build_swin_backbone`` in Detectron2's ``BACKBONE_REGISTRY``.
The backbones themselves are imported on first use (``from dino_d2.modeling.backbone import
SwinBackbone`` works as before): they need timm, which a ResNet model never imports.
"""

from ...utils.lazy import lazy_exports

from .swin_config import add_swin_config, build_swin_backbone
from .swin_presets import SWIN_PRESETS

__all__ = [
    "SWIN_PRESETS",
    "SimplePyramid",
    "SwinBackbone",
    "TimmBackbone",
    "add_swin_config",
    "build_swin_backbone",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "SwinBackbone": ".swin",
        "SimplePyramid": ".simple_pyramid",
        "TimmBackbone": ".timm",
    },
)
