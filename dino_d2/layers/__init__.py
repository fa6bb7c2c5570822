"""Ops and small building blocks shared by the DINO model."""

from .deformable_attention import MultiScaleDeformableAttention
from .fast_path import (
    OneDNNLinear,
    optimize_for_cpu_inference,
    optimize_for_training,
    optimized_copy,
)
from .ms_deform_attn import (
    MSDA_BACKENDS,
    available_backends,
    cuda_kernel_compiled,
    load_extension,
    msda_backend,
    msda_implementation,
    multi_scale_deformable_attn,
)
from .ms_deform_attn_reference import (
    multi_scale_deformable_attn_gather,
    multi_scale_deformable_attn_pytorch,
)
from .multi_scale_levels import MultiScaleLevels, level_index_tensors, valid_extent

__all__ = [
    "MSDA_BACKENDS",
    "MultiScaleDeformableAttention",
    "MultiScaleLevels",
    "OneDNNLinear",
    "available_backends",
    "cuda_kernel_compiled",
    "level_index_tensors",
    "load_extension",
    "msda_backend",
    "msda_implementation",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_gather",
    "multi_scale_deformable_attn_pytorch",
    "optimize_for_cpu_inference",
    "optimize_for_training",
    "optimized_copy",
    "valid_extent",
]
