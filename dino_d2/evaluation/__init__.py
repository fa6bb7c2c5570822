"""Evaluation: Detectron2's ``COCOEvaluator`` whose output files a failed write never damages."""

from .coco_evaluation import COCOEvaluator

__all__ = ["COCOEvaluator"]
