"""dino_d2's OpenVINO extension: deformable attention as one OpenVINO operation.

An ONNX export made with ``msda_backend="openvino"`` holds one
``dino_d2::MultiScaleDeformableAttention`` node per attention instead of the ``GridSample``
decomposition. OpenVINO runs that node with dino_d2's CPU kernel once the library
``dino_d2/_openvino_msda*.so`` is added to its ``Core`` (``setup.py`` compiles it against the
installed ``openvino`` wheel; ``csrc/openvino`` holds its source). No other runtime knows the
node: onnxruntime cannot load such a file.
"""

import glob
import os
from typing import Any, Optional

__all__ = ["DOMAIN", "OP_TYPE", "add_extension", "extension_path", "needs_extension"]

# The ONNX domain and operator type of the node (csrc/openvino/msda_openvino.cpp registers them).
DOMAIN = "dino_d2"
OP_TYPE = "MultiScaleDeformableAttention"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extension_path() -> Optional[str]:
    """The compiled library beside the package, or None when it was not built."""
    found = sorted(glob.glob(os.path.join(_PACKAGE, "_openvino_msda*.so")))
    return found[0] if found else None


def needs_extension(model: Any) -> bool:
    """Whether a model holds dino_d2's node: an ``onnx.ModelProto``, or the path of an ``.onnx``
    file or of an OpenVINO IR ``.xml`` (whose layers name their opset as ``version``)."""
    if isinstance(model, str) and model.endswith(".xml"):
        with open(model, encoding="utf-8") as f:
            return f'version="{DOMAIN}"' in f.read()
    if isinstance(model, str):
        import onnx

        model = onnx.load(model, load_external_data=False)
    return any(opset.domain == DOMAIN for opset in model.opset_import)


def add_extension(core: Any) -> str:
    """Adds the library to an ``openvino.Core``; returns its path.

    Raises:
        ImportError: the library was not built (OpenVINO was missing when dino_d2 was built) or
            does not load into this OpenVINO (built against another version).
    """
    path = extension_path()
    if path is None:
        raise ImportError(
            f"the ONNX graph holds {DOMAIN}::{OP_TYPE} nodes, which OpenVINO runs with dino_d2's "
            f"extension, and no {_PACKAGE}/_openvino_msda*.so was built: install openvino, then "
            "rebuild dino_d2 (`pip install --no-build-isolation -e .`, or `make setup`)"
        )
    try:
        core.add_extension(path)
    except RuntimeError as e:
        raise ImportError(
            f"OpenVINO cannot load dino_d2's extension {path} ({e}); rebuild dino_d2 against the "
            "installed openvino (`pip install --no-build-isolation -e .`)"
        ) from e
    return path
