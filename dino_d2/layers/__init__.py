"""Ops and small building blocks shared by the DINO model."""

from .fast_path import (
    OneDNNLinear,
    optimize_for_cpu_inference,
    optimize_for_training,
    optimized_copy,
)
from .ms_deform_attn import (
    MSDA_IMPLEMENTATIONS,
    MultiScaleDeformableAttention,
    available_backends,
    cuda_kernel_compiled,
    level_index_tensors,
    load_extension,
    msda_implementation,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_gather,
    multi_scale_deformable_attn_pytorch,
)

__all__ = [
    "MSDA_IMPLEMENTATIONS",
    "MultiScaleDeformableAttention",
    "OneDNNLinear",
    "available_backends",
    "cuda_kernel_compiled",
    "level_index_tensors",
    "load_extension",
    "msda_implementation",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_gather",
    "multi_scale_deformable_attn_pytorch",
    "optimize_for_cpu_inference",
    "optimize_for_training",
    "optimized_copy",
]
