"""Measuring a dino_d2 model against what the machine allows (see :mod:`.limits`)."""

__all__ = []
