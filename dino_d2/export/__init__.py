"""Export of dino_d2 models: ONNX (deformable attention decomposed into standard operators).

``torch.export`` and AOTInductor need nothing from here: the compiled deformable-attention op
has fake kernels (see :mod:`dino_d2.layers.ms_deform_attn`) and stays one node in their graphs.
"""

from .onnx import (
    MIN_OPSET,
    MSDA_ONNX_BACKENDS,
    canonical_msda_backend,
    check_onnx_graph,
    export_onnx,
    onnxruntime_session,
    run_onnxruntime,
)

__all__ = [
    "MIN_OPSET",
    "MSDA_ONNX_BACKENDS",
    "canonical_msda_backend",
    "check_onnx_graph",
    "export_onnx",
    "onnxruntime_session",
    "run_onnxruntime",
]
