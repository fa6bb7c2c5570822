"""DINO (DETR with Improved deNoising anchOr boxes) as a Detectron2 project.

``import dino_d2`` registers what Detectron2 needs: ``DINO`` in ``META_ARCH_REGISTRY`` and the
Swin backbone in ``BACKBONE_REGISTRY``.
"""

from . import modeling  # noqa: F401  (registers DINO and the backbones)

__all__ = ["modeling"]
