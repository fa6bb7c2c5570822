"""Research built on DINO, as extensions: each project imports the core and adds to it; the core
never imports a project (Detectron2 keeps such work under ``projects/``)."""

__all__ = []
