"""Names a package re-exports without importing the module that defines them until first use
(PEP 562), so that importing the package does not pull in what only some uses need (timm for a
timm backbone, the training engine for training, onnx for exporting)."""

import importlib
from typing import Callable, Dict

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package`` that imports each name on first access.

    Args:
        package: the ``__name__`` of the package whose ``__getattr__`` this becomes.
        names: exported name -> the module defining it, relative to ``package`` (".swin").

    Returns:
        ``__getattr__(name)``: imports ``names[name]``'s module, stores the value in the package
        (so later accesses do not come back here) and returns it.

    Raises (from the returned function):
        AttributeError: ``name`` is not one of ``names``, as a plain attribute lookup would.
    """

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
