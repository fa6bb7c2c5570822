"""Reading checkpoint files without running the code a pickle can carry.

A checkpoint is a pickle, and unpickling calls whatever functions the file names: a file from a
model zoo, a forum post or a colleague can run any code when it is loaded. Every dino_d2 path that
reads a checkpoint (training initialization, ``--resume``, ``--eval-only``, the demo, the
predictor, the benchmark, the exporter, the converter, ``tools/verify_conversion.py``) goes
through :func:`load_checkpoint_file`, which by default only rebuilds data:

* ``torch.save`` files (``.pth``, ``.pt``, pycls' ``.pyth``, any other name):
  ``torch.load(weights_only=True)``, with the globals of the known formats allowed for that call
  only (:data:`CHECKPOINT_GLOBALS`: the authors' ``argparse.Namespace``, numpy scalars, dtypes and
  arrays, found in the authors', detrex's and EasyCV's files). dino_d2's own checkpoints (model,
  trainer with optimizer and scheduler state, EMA) are tensors and containers only.
* ``.pkl`` files (Detectron2's model-zoo format: a dict of numpy arrays with ``__author__`` and
  ``matching_heuristics``; Detectron1 / Caffe2 blobs): a restricted unpickler that admits exactly
  numpy array, dtype and scalar reconstruction and builtin containers (:data:`PKL_GLOBALS`).

Anything else stops with :class:`UntrustedFileError`, naming the file, the globals found (e.g.
``posix.system``, ``__main__.Payload``) and the two ways on: ``--unsafe-load`` (``unsafe=True``)
for a file you trust, which loads it with full unpickling and logs a warning naming it, or
re-saving its weights alone.
"""

import argparse
import importlib
import logging
import pickle
import re
from typing import Any, Iterable, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "UNSAFE_LOAD_FLAG",
    "CHECKPOINT_GLOBALS",
    "PKL_GLOBALS",
    "UntrustedFileError",
    "add_unsafe_load_argument",
    "load_checkpoint_file",
]

logger = logging.getLogger(__name__)

# The one name of the opt-in, on every command line.
UNSAFE_LOAD_FLAG = "--unsafe-load"

_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
# (module, name) of what a numpy array, dtype or scalar pickles as (protocol 5 writes arrays with
# ``numeric._frombuffer``); files written under numpy 1 name ``numpy.core``, under numpy 2
# ``numpy._core``.
_NUMPY_CORE_FUNCTIONS = (
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
)
_NUMPY_GLOBALS = {
    (f"{core}.{module}", name)
    for core in ("numpy.core", "numpy._core")
    for module, name in _NUMPY_CORE_FUNCTIONS
} | {("numpy", "ndarray"), ("numpy", "dtype")}

# What the restricted .pkl unpickler admits: numpy data and builtin containers. ``_codecs.encode``
# is how protocol 2 writes bytes (an array's buffer) under Python 3.
PKL_GLOBALS = frozenset(
    _NUMPY_GLOBALS
    | {("collections", "OrderedDict"), ("_codecs", "encode")}
    | {("builtins", name) for name in ("set", "frozenset", "bytearray", "complex", "slice")}
    | {("__builtin__", name) for name in ("set", "frozenset", "bytearray", "complex", "slice")}
)


def _numpy_dtype_classes() -> List[Tuple[type, str]]:
    """numpy 2 pickles a dtype with its class (``numpy.dtypes.Float32DType``, ...)."""
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    return [
        (cls, f"numpy.dtypes.{name}")
        for name, cls in vars(dtypes).items()
        if isinstance(cls, type) and issubclass(cls, np.dtype)
    ]


def _checkpoint_globals() -> List[Any]:
    """The globals that ``torch.load(weights_only=True)`` admits for the known checkpoints."""
    allowed: List[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    for core in ("numpy.core", "numpy._core"):
        for module, name in _NUMPY_CORE_FUNCTIONS:
            function = getattr(importlib.import_module(f"{_NUMPY_CORE}.{module}"), name)
            allowed.append((function, f"{core}.{module}.{name}"))
    return allowed + _numpy_dtype_classes()


# Allowed for the duration of each weights-only load (torch.serialization.safe_globals).
CHECKPOINT_GLOBALS = tuple(_checkpoint_globals())


class UntrustedFileError(pickle.UnpicklingError):
    """A checkpoint holds Python objects whose unpickling could run code; nothing was run.

    Attributes:
        path: the file.
        found: the globals (``module.name``) the file refers to that are not allowed.
    """

    def __init__(self, path: str, found: Iterable[str], detail: str = ""):
        self.path = path
        self.found = sorted(set(found))
        self.detail = detail
        what = ", ".join(self.found) if self.found else "objects other than tensors and numbers"
        reason = f" ({detail})" if detail else ""
        message = (
            f"{path} was not loaded: its pickle refers to {what}{reason}, outside what dino_d2 "
            "loads by default (tensors, numpy arrays, numbers, containers); unpickling it could "
            "run code (a pickle can call any function it names). If you trust the file, give "
            f"{UNSAFE_LOAD_FLAG} (unsafe=True in Python). Or re-save its weights alone, once, "
            "where you trust it: c = torch.load(path, weights_only=False) (a .pkl: "
            'pickle.load(f, encoding="latin1")); torch.save({"model": c["model"]}, '
            '"weights.pth"), which then loads without the flag.'
        )
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.path, self.found, self.detail)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals of :data:`PKL_GLOBALS`; anything else raises."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in PKL_GLOBALS:
            raise UntrustedFileError(self.path, [f"{module}.{name}"])
        if module.startswith(("numpy.core.", "numpy._core.")):  # this numpy's name for it
            module = f"{_NUMPY_CORE}.{module.rsplit('.', 1)[1]}"
        return super().find_class(module, name)


def _refused_globals(path: str, error: Exception) -> List[str]:
    """The globals of ``path`` that a weights-only load refuses, read without unpickling."""
    allowed = {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
        for g in CHECKPOINT_GLOBALS
    }
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        found = []  # not a zip file (a legacy torch.save): read the names from the error
    found = [name for name in found if name not in allowed]
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return found


def _torch_load(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _refused_globals(path, error)
        detail = "" if found else str(error).strip().splitlines()[0]
        raise UntrustedFileError(path, found, detail) from None


def _pkl_load(path: str) -> Any:
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, path).load()


def load_checkpoint_file(path: str, unsafe: bool = False) -> Any:
    """Loads a checkpoint on the CPU without running code, unless ``unsafe``.

    Args:
        path: a local file. ``.pkl``: a pickle in Detectron2's model-zoo format (numpy arrays);
            anything else: a ``torch.save`` file.
        unsafe: full unpickling (``--unsafe-load``), only for files you trust; logs a warning
            naming the file.

    Returns:
        what the file holds: for ``.pkl`` numpy arrays in builtin containers, otherwise tensors
        (on the CPU), containers, numbers, strings and the allowed globals' objects.

    Raises:
        UntrustedFileError: the file refers to a global outside the allowed ones; nothing in it
            was run.
    """
    if unsafe:
        logger.warning(
            f"Loading {path} with {UNSAFE_LOAD_FLAG}: full unpickling runs any code the file "
            "carries; use it only for files you trust"
        )
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=False)
    if path.endswith(".pkl"):
        return _pkl_load(path)
    return _torch_load(path)


def add_unsafe_load_argument(parser: argparse.ArgumentParser, what: Optional[str] = None) -> None:
    """Adds ``--unsafe-load`` (``args.unsafe_load``), the single opt-in of every tool.

    Args:
        parser: the tool's parser.
        what: the files it applies to, for the help text (default: "checkpoints").
    """
    parser.add_argument(
        UNSAFE_LOAD_FLAG,
        action="store_true",
        help=f"load {what or 'checkpoints'} with full unpickling, which can run code the file "
        "carries (only for files you trust); by default a file holding Python objects other "
        "than tensors, numbers and containers is refused",
    )
