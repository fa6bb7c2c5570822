"""dino_d2's deformable-attention node and the libraries that run it in OpenVINO and onnxruntime.

An ONNX export made with ``msda_backend="node"`` holds one ``dino_d2::MultiScaleDeformableAttention``
node per attention instead of the ``GridSample`` decomposition. Two runtimes run that node with
dino_d2's CPU kernel, each through a library that ``setup.py`` compiles beside the package:

* onnxruntime: ``dino_d2/_onnxruntime_msda*.so``, a custom op library
  (``csrc/onnxruntime``), registered on the session's options. It is built against onnxruntime's
  C headers (``make`` fetches them from Debian's ``libonnxruntime-dev``; see ``setup.py``) and
  links nothing of onnxruntime, so it loads into any onnxruntime at least as new as those headers.
* OpenVINO: ``dino_d2/_openvino_msda*.so`` (``csrc/openvino``), added to the ``Core``; built
  against the installed ``openvino`` wheel.

The same ``.onnx`` file runs in both.
"""

import glob
import os
from typing import Any, Optional

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "add_to_onnxruntime",
    "add_to_openvino",
    "has_node",
    "onnxruntime_library",
    "openvino_library",
]

# The ONNX domain and operator type of the node (both libraries register them).
DOMAIN = "dino_d2"
OP_TYPE = "MultiScaleDeformableAttention"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REBUILD = "rebuild dino_d2 (`pip install --no-build-isolation -e .`, or `make setup`)"


def _library(stem: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(_PACKAGE, stem + "*.so")))
    return found[0] if found else None


def onnxruntime_library() -> Optional[str]:
    """The onnxruntime custom op library beside the package, or None when it was not built."""
    return _library("_onnxruntime_msda")


def openvino_library() -> Optional[str]:
    """The OpenVINO extension library beside the package, or None when it was not built."""
    return _library("_openvino_msda")


def has_node(model: Any) -> bool:
    """Whether a model holds dino_d2's node: an ``onnx.ModelProto``, or the path of an ``.onnx``
    file or of an OpenVINO IR ``.xml`` (whose layers name their opset as ``version``)."""
    if isinstance(model, str) and model.endswith(".xml"):
        with open(model, encoding="utf-8") as f:
            return f'version="{DOMAIN}"' in f.read()
    if isinstance(model, str):
        import onnx

        model = onnx.load(model, load_external_data=False)
    return any(opset.domain == DOMAIN for opset in model.opset_import)


def add_to_onnxruntime(options: Any) -> str:
    """Registers the custom op library on an ``onnxruntime.SessionOptions``; returns its path.

    Raises:
        ImportError: the library was not built (onnxruntime's C headers were missing when dino_d2
            was built) or does not load into this onnxruntime.
    """
    path = onnxruntime_library()
    if path is None:
        raise ImportError(
            f"the ONNX graph holds {DOMAIN}::{OP_TYPE} nodes, which onnxruntime runs with "
            f"dino_d2's custom op library, and no {_PACKAGE}/_onnxruntime_msda*.so was built: "
            "onnxruntime's C headers were not found (`make setup` fetches them; or install "
            f"Debian's libonnxruntime-dev, or set DINO_D2_ONNXRUNTIME_INCLUDE), then {_REBUILD}; "
            "or run the file in OpenVINO"
        )
    try:
        options.register_custom_ops_library(path)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, RuntimeError)
        raise ImportError(
            f"onnxruntime cannot load dino_d2's library {path} ({e}); {_REBUILD}"
        ) from e
    return path


def add_to_openvino(core: Any) -> str:
    """Adds the extension library to an ``openvino.Core``; returns its path.

    Raises:
        ImportError: the library was not built (OpenVINO was missing when dino_d2 was built) or
            does not load into this OpenVINO (built against another version).
    """
    path = openvino_library()
    if path is None:
        raise ImportError(
            f"the ONNX graph holds {DOMAIN}::{OP_TYPE} nodes, which OpenVINO runs with dino_d2's "
            f"extension, and no {_PACKAGE}/_openvino_msda*.so was built: install openvino, then "
            f"{_REBUILD}"
        )
    try:
        core.add_extension(path)
    except RuntimeError as e:
        raise ImportError(
            f"OpenVINO cannot load dino_d2's extension {path} ({e}); rebuild dino_d2 against the "
            "installed openvino (`pip install --no-build-isolation -e .`)"
        ) from e
    return path
