"""Backbones: Swin Transformer (on timm), any timm ``features_only`` network, and ViTDet's simple
feature pyramid over a single-scale backbone such as a plain ViT.

Importing this package registers ``build_swin_backbone`` in Detectron2's ``BACKBONE_REGISTRY``.
"""

from .simple_pyramid import SimplePyramid
from .swin import SWIN_PRESETS, SwinBackbone, add_swin_config, build_swin_backbone
from .timm import TimmBackbone

__all__ = [
    "SWIN_PRESETS",
    "SimplePyramid",
    "SwinBackbone",
    "TimmBackbone",
    "add_swin_config",
    "build_swin_backbone",
]
