"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159; used by DINO's encoder and
decoder).

The op samples every head's value map at a few learned locations per feature level and returns
the attention-weighted sum. Two backends compute it:

* ``pytorch``: :func:`multi_scale_deformable_attn_pytorch`, built on ``F.grid_sample``; any dtype
  and device, always available, the reference for the others.
* the compiled kernels of the ``dino_d2._C`` extension (``torch.ops.dino_d2.ms_deform_attn_*``):
  ``cpu`` (float32 / float64) and ``cuda`` when it was compiled with the CUDA kernels.

:func:`multi_scale_deformable_attn` picks the backend on every call from the tensors' device and
dtype. Setting the environment variable ``DINO_D2_MSDA_BACKEND=pytorch`` forces the reference.

Conventions shared by every function here (batch first):

* ``value``: (N, S, M, D), S = sum over levels of H_l * W_l, M heads of D channels each.
* ``spatial_shapes``: (L, 2) int64, (H_l, W_l) of each level, on the device of ``value``.
* ``level_start_index``: (L,) int64, where level l starts in the S axis.
* ``sampling_locations``: (N, Q, M, L, P, 2), normalized (x, y) with (0, 0) the top-left corner of
  the map and (1, 1) its bottom-right corner; locations outside [0, 1] read zeros.
* ``attention_weights``: (N, Q, M, L, P).
* output: (N, Q, M * D).
"""

import functools
import importlib
import math
import os
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "MultiScaleDeformableAttention",
    "available_backends",
    "cuda_kernel_compiled",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
]

# Name of the environment variable that selects the backend ("auto" or "pytorch").
BACKEND_ENV_VAR = "DINO_D2_MSDA_BACKEND"
_OP_NAME = "dino_d2::ms_deform_attn_forward"
# Dtypes the compiled kernels accept, per device type.
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention in plain PyTorch (the reference implementation).

    Bilinear sampling with zero padding, exactly ``F.grid_sample(align_corners=False,
    padding_mode="zeros")``. Works for any dtype and device and is differentiable with respect to
    every floating-point input.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level; sum of H_l * W_l must equal S.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.

    Returns:
        (N, Q, M * D) attention output.
    """
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on (N * M, D, H, W) maps with a (N * M, Q, P, 2) grid in [-1, 1].
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)
    per_level = []
    for level, (h, w) in enumerate(shapes):
        value_l = values[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        per_level.append(
            F.grid_sample(
                value_l,
                grids[:, :, level],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )
    # (N * M, D, Q, L, P) times (N * M, 1, Q, L, P), summed over levels and points.
    sampled = torch.stack(per_level, dim=3)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels, p)
    output = (sampled * weights).sum(dim=(3, 4))
    return output.view(n, m * d, q).transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=None)
def _extension_loaded() -> bool:
    """Imports ``dino_d2._C`` once; warns once and returns False when it cannot be loaded."""
    try:
        # Importing the extension registers the torch.ops.dino_d2 operators.
        importlib.import_module("dino_d2._C")
    except (ImportError, OSError) as e:
        warnings.warn(
            f"dino_d2._C could not be loaded ({e}); multi-scale deformable attention falls back "
            "to the slower pure-PyTorch implementation. Build it with "
            "`python setup.py build_ext --inplace` or `pip install -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _kernel_registered(device_type: str) -> bool:
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not _extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, dispatch_key)


def cuda_kernel_compiled() -> bool:
    """Whether ``dino_d2._C`` was compiled with the CUDA kernels (False without the extension)."""
    return _extension_loaded() and bool(torch.ops.dino_d2.compiled_with_cuda())


def available_backends() -> List[str]:
    """Names of the backends usable in this process.

    Returns:
        A subset of ``["pytorch", "cpu", "cuda"]``: ``pytorch`` always, ``cpu`` when the compiled
        CPU kernel is registered, ``cuda`` when the CUDA kernel is registered and a GPU is visible.
    """
    backends = ["pytorch"]
    if _kernel_registered("cpu"):
        backends.append("cpu")
    if _kernel_registered("cuda") and torch.cuda.is_available():
        backends.append("cuda")
    return backends


def _use_kernel(value: torch.Tensor) -> bool:
    """Whether a compiled kernel handles tensors like ``value`` (device, dtype, settings)."""
    choice = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower()
    if choice == "pytorch":
        return False
    if choice not in ("", "auto"):
        raise ValueError(f"{BACKEND_ENV_VAR} must be 'auto' or 'pytorch', got {choice!r}")
    device_type = value.device.type
    if value.dtype not in _KERNEL_DTYPES.get(device_type, ()):
        return False
    return _kernel_registered(device_type)


class _MultiScaleDeformableAttnFunction(torch.autograd.Function):
    """Autograd wrapper around ``torch.ops.dino_d2.ms_deform_attn_forward`` / ``_backward``."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return torch.ops.dino_d2.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = torch.ops.dino_d2.ms_deform_attn_backward(
            *ctx.saved_tensors, grad_output
        )
        needs = ctx.needs_input_grad
        return (
            grad_value if needs[0] else None,
            None,
            None,
            grad_locations if needs[3] else None,
            grad_weights if needs[4] else None,
        )


def multi_scale_deformable_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention on the fastest backend available for these tensors.

    The compiled kernel of the tensors' device is used when the extension provides it for their
    dtype (CPU: float32 and float64); otherwise, or when ``DINO_D2_MSDA_BACKEND=pytorch``, the
    result comes from :func:`multi_scale_deformable_attn_pytorch`. Inputs of different floating
    dtypes are promoted to a common one first. Differentiable with respect to ``value``,
    ``sampling_locations`` and ``attention_weights`` (first order).

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        level_start_index: (L,) int64 start of each level in the S axis.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.

    Returns:
        (N, Q, M * D) attention output, in the promoted dtype.
    """
    dtype = torch.promote_types(
        value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    )
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    if not _use_kernel(value):
        return multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    return _MultiScaleDeformableAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections (Deformable DETR, Sec. 4.1).

    Every query predicts, for each of ``num_heads`` heads, ``num_points`` sampling offsets per
    level around its reference point and the softmax-normalized weights of those
    ``num_levels * num_points`` samples. The residual connection is left to the caller.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        """
        Args:
            embed_dim: channels C of queries, values and output; divisible by ``num_heads``.
            num_heads: attention heads M; each has C / M channels.
            num_levels: feature levels L.
            num_points: sampling points P per head and level.
            dropout: dropout probability applied to the output.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, samples * 2)
        self.attention_weights = nn.Linear(embed_dim, samples)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation.

        Offsets start at zero weight with a bias that places head h's points along the direction
        at angle 2 pi h / M (scaled so that the larger coordinate is 1), point k at k + 1 times
        that direction, the same on every level; attention weights start uniform.
        """
        m, l, p = self.num_heads, self.num_levels, self.num_points
        angles = torch.arange(m, dtype=torch.float64) * (2.0 * math.pi / m)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, p + 1, dtype=torch.float64).view(1, 1, p, 1)
        bias = directions.view(m, 1, 1, 2) * scale
        bias = bias.expand(m, l, p, 2)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Q, C) queries, positional embedding already added.
            reference_points: (N, Q, L, 2) normalized (x, y) points in [0, 1], or (N, Q, L, 4)
                normalized (cx, cy, w, h) boxes. Offsets are divided by (W_l, H_l) for points and
                scaled by (w, h) * 0.5 / num_points for boxes.
            value: (N, S, C) flattened multi-scale features, S = sum over levels of H_l * W_l.
            spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
            level_start_index: (L,) int64 start of each level in the S axis.
            value_padding_mask: optional (N, S) bool, True at padded pixels; their values are
                zeroed so they never contribute.

        Returns:
            (N, Q, C) output of ``output_proj`` (no residual).
        """
        n, q, _ = query.shape
        s = value.shape[1]
        m, l, p = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape != (l, 2):
            raise ValueError(f"spatial_shapes must have shape ({l}, 2), got {spatial_shapes.shape}")
        if reference_points.shape[:3] != (n, q, l) or reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"reference_points must have shape ({n}, {q}, {l}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.embed_dim // m)

        offsets = self.sampling_offsets(query).view(n, q, m, l, p, 2)
        weights = self.attention_weights(query).view(n, q, m, l * p).softmax(-1)
        weights = weights.view(n, q, m, l, p)

        if reference_points.shape[-1] == 2:
            # (W_l, H_l) per level, so that an offset of 1 moves by one pixel of that level.
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / p * sizes * 0.5

        output = multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights
        )
        return self.dropout(self.output_proj(output))
