"""Ops and small building blocks shared by the DINO model."""

from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    available_backends,
    cuda_kernel_compiled,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "available_backends",
    "cuda_kernel_compiled",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
]
