"""Converters from other checkpoint formats to dino_d2 state dicts.

``convert_checkpoint(source, checkpoint)`` handles trained DINO detectors of the authors
(``idea``), detrex and EasyCV, and backbone initializations (``torchvision-resnet``, ``swin``);
``save_checkpoint`` writes the result as a verified Detectron2 checkpoint. The command-line tool
is ``tools/convert_checkpoint.py``. :class:`AtomicCheckpointer` is the training script's
checkpointer: Detectron2's, with files that a killed job never leaves half-written;
:mod:`dino_d2.utils.atomic` writes any file of the output folder that way, with errors
that say how much space a failed write needed. Every checkpoint is read by
:func:`load_checkpoint_file` (:mod:`dino_d2.checkpoint.loading`), which never runs code a file
carries unless ``--unsafe-load`` is given.
"""

from ..utils.lazy import lazy_exports
from .checkpointer import AtomicCheckpointer
from .loading import UntrustedFileError, add_unsafe_load_argument, load_checkpoint_file
from .mapping import ConversionError

__all__ = [
    "AtomicCheckpointer",
    "SOURCES",
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "convert_swin_checkpoint",
    "detect_source",
    "load_checkpoint_file",
    "add_unsafe_load_argument",
    "UntrustedFileError",
    "load_config",
    "save_checkpoint",
]

# The converters are imported on first use: the Swin one needs timm, which loading a
# checkpoint into a built model never does.
__getattr__ = lazy_exports(
    __name__,
    {
        "SOURCES": ".convert",
        "ConversionResult": ".convert",
        "convert_checkpoint": ".convert",
        "detect_source": ".convert",
        "load_config": ".convert",
        "save_checkpoint": ".convert",
        "convert_swin_checkpoint": ".swin",
    },
)
