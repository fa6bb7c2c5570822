from .detections import DINODetections
from .dino import DINO

__all__ = ["DINO", "DINODetections"]
