"""Backbones: Swin Transformer (on timm) and any timm ``features_only`` network.

Importing this package registers ``build_swin_backbone`` in Detectron2's ``BACKBONE_REGISTRY``.
"""

from .swin import SWIN_PRESETS, SwinBackbone, add_swin_config, build_swin_backbone
from .timm import TimmBackbone

__all__ = [
    "SWIN_PRESETS",
    "SwinBackbone",
    "TimmBackbone",
    "add_swin_config",
    "build_swin_backbone",
]
