"""Multi-scale deformable attention as a module: the projections around the op (Deformable DETR,
arXiv 2010.04159, Sec. 4.1; DINO's encoder self-attention and decoder cross-attention).

The module reads the flattened multi-scale sequence through :class:`MultiScaleLevels` and calls
:func:`~dino_d2.layers.ms_deform_attn.multi_scale_deformable_attn`, which picks the op's backend.
"""

import math

import torch
from torch import nn

from .ms_deform_attn import multi_scale_deformable_attn
from .multi_scale_levels import MultiScaleLevels

__all__ = ["MultiScaleDeformableAttention"]


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
        levels: MultiScaleLevels,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Q, C) queries, positional embedding already added.
            reference_points: (N, Q, L, 2) normalized (x, y) points in [0, 1], or (N, Q, L, 4)
                normalized (cx, cy, w, h) boxes. Offsets are divided by (W_l, H_l) for points and
                scaled by (w, h) * 0.5 / num_points for boxes.
            value: (N, S, C) flattened multi-scale features, S = sum over levels of H_l * W_l.
            levels: the geometry of ``value``: its L level shapes (on the host, so that an export
                with dynamic sizes keeps them symbolic, and as tensors for the compiled op), where
                each level starts, and the padding mask, whose values are zeroed so that they
                never contribute.

        Returns:
            (N, Q, C) output of ``output_proj`` (no residual).
        """
        spatial_shapes = levels.spatial_shapes
        n, q, _ = query.shape
        s = value.shape[1]
        m, l, p = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape != (l, 2):
            raise ValueError(
                f"levels.spatial_shapes must have shape ({l}, 2) (the attention has {l} levels), "
                f"got {tuple(spatial_shapes.shape)}"
            )
        if reference_points.shape[:3] != (n, q, l) or reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"reference_points must have shape ({n}, {q}, {l}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value)
        if levels.value_padding_mask is not None:
            value = value.masked_fill(levels.value_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.embed_dim // m)

        weights = self.attention_weights(query)
        weights = weights.view(n, q, m, l * p).softmax(-1).view(n, q, m, l, p)

        if reference_points.shape[-1] == 2:
            # An offset of 1 moves by one pixel of its level: offsets are divided by that
            # level's (W_l, H_l) in the same pass that adds them to the reference points.
            per_level = (1.0 / spatial_shapes.flip(-1).to(query.dtype))[None, :, None, :]
            per_level = per_level.expand(m, l, p, 2).reshape(m, l * p * 2)
            offsets = self.sampling_offsets(query).view(n, q, m, l * p * 2)
            start = reference_points[:, :, None, :, None, :].expand(n, q, 1, l, p, 2)
            locations = torch.addcmul(start.reshape(n, q, 1, l * p * 2), offsets, per_level)
            locations = locations.view(n, q, m, l, p, 2)
        else:
            offsets = self.sampling_offsets(query)
            offsets = offsets.view(n, q, m, l, p, 2)
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / p * sizes * 0.5

        output = multi_scale_deformable_attn(
            value,
            spatial_shapes,
            levels.level_start_index,
            locations,
            weights,
            level_shapes=levels.shapes,
        )
        return self.dropout(self.output_proj(output))
