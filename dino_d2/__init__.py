"""DINO (DETR with Improved deNoising anchOr boxes) as a Detectron2 project."""
