"""Pure-PyTorch references of multi-scale deformable attention (Deformable DETR, arXiv 2010.04159).

Two backends of :func:`dino_d2.layers.ms_deform_attn.multi_scale_deformable_attn` live here:

* ``"grid_sample"``: :func:`multi_scale_deformable_attn_pytorch`, built on ``F.grid_sample``; any
  dtype and device, always available, the reference for the others. Exported to ONNX, it becomes
  ``GridSample`` nodes (opset 16 or newer).
* ``"gather"``: :func:`multi_scale_deformable_attn_gather`, the same bilinear sampling written with
  index arithmetic and one ``Gather`` per corner, for runtimes that mishandle ``GridSample``.

Both take the op's tensors as described in :mod:`dino_d2.layers.ms_deform_attn` (batch first,
``value`` (N, S, M, D), ``sampling_locations`` (N, Q, M, L, P, 2) normalized (x, y) in [0, 1],
``attention_weights`` (N, Q, M, L, P), output (N, Q, M * D)), and sample bilinearly with zero
padding, exactly ``F.grid_sample(align_corners=False, padding_mode="zeros")``: location x samples
pixel coordinate ``x * W_l - 0.5``.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .multi_scale_levels import LevelShapes

__all__ = ["multi_scale_deformable_attn_gather", "multi_scale_deformable_attn_pytorch"]


def _host_level_shapes(
    spatial_shapes: torch.Tensor, level_shapes: Optional[LevelShapes]
) -> List[Tuple[int, int]]:
    """(H_l, W_l) of every level as Python ints or SymInts, from ``level_shapes`` when given."""
    if level_shapes is None:
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    shapes = [tuple(pair) for pair in level_shapes]
    if len(shapes) != spatial_shapes.shape[0] or any(len(pair) != 2 for pair in shapes):
        raise ValueError(
            f"level_shapes must hold {spatial_shapes.shape[0]} (H_l, W_l) pairs like "
            f"spatial_shapes, got {list(level_shapes)}"
        )
    return shapes


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    level_shapes: Optional[LevelShapes] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (the reference implementation).

    Bilinear sampling with zero padding, exactly ``F.grid_sample(align_corners=False,
    padding_mode="zeros")``. Works for any dtype and device and is differentiable with respect to
    every floating-point input.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level; sum of H_l * W_l must equal S.
            Only read (on the host) when ``level_shapes`` is None.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.
        level_shapes: optional L pairs (H_l, W_l) of Python ints or SymInts, the same sizes as
            ``spatial_shapes``; needed to export with dynamic sizes.

    Returns:
        (N, Q, M * D) attention output.
    """
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = _host_level_shapes(spatial_shapes, level_shapes)
    values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on (N * M, D, H, W) maps with a (N * M, P, Q, 2) grid in [-1, 1]: the
    # points go before the queries, so that each level's samples come out as (N * M, D, P, Q)
    # and the weighted sum reduces a middle axis, Q values at a time (not a trailing axis of P
    # values), with one concatenation and one product over all levels.
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1)
    per_level = []
    for level, (h, w) in enumerate(shapes):
        value_l = values[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        per_level.append(
            F.grid_sample(
                value_l,
                grids[:, level],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )
    # (N * M, D, L * P, Q) times (N * M, 1, L * P, Q), summed over levels and points.
    sampled = torch.cat(per_level, dim=2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(n * m, 1, num_levels * p, q)
    output = (sampled * weights).sum(dim=2)
    return output.view(n, m * d, q).transpose(1, 2).contiguous()


def multi_scale_deformable_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with explicit bilinear interpolation and row gathers.

    The same result as :func:`multi_scale_deformable_attn_pytorch` (``F.grid_sample`` with
    ``align_corners=False, padding_mode="zeros"``) without ``grid_sample``: location ``(x, y)`` of
    level l reads pixel coordinate ``(x * W_l - 0.5, y * H_l - 0.5)``; each of its four corner
    pixels gets the bilinear weight, times zero when the corner lies outside the map. The corners
    are fetched as rows of ``value`` viewed as (N * S * M, D), one ``index_select`` (ONNX
    ``Gather``) per corner position over all levels at once. The level sizes are read from the
    ``spatial_shapes`` and ``level_start_index`` tensors inside the graph, so no size is needed on
    the host and an export with dynamic sizes stays dynamic. Works for any dtype and device and
    is differentiable with respect to every floating-point input.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        level_start_index: (L,) int64 start of each level in the S axis.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.

    Returns:
        (N, Q, M * D) attention output.
    """
    n, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    device = value.device
    level_view = (1, 1, 1, num_levels, 1)
    heights = spatial_shapes[:, 0].view(level_view)
    widths = spatial_shapes[:, 1].view(level_view)
    # Row of pixel (x, y) of level l for batch element b and head h in value viewed as
    # (N * S * M, D): (b * S + start_l + y * W_l + x) * M + h.
    row_base = (torch.arange(n, device=device) * s).view(n, 1, 1, 1, 1)
    row_base = row_base + level_start_index.view(level_view)
    heads = torch.arange(m, device=device).view(1, 1, m, 1, 1)
    rows_of_value = value.reshape(n * s * m, d)

    x = sampling_locations[..., 0] * widths.to(sampling_locations.dtype) - 0.5
    y = sampling_locations[..., 1] * heights.to(sampling_locations.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    output = value.new_zeros((n, q, m, d))
    for dy, weight_y in ((0, 1 - fy), (1, fy)):
        corner_y = y0 + dy
        inside_y = (corner_y >= 0) & (corner_y <= heights - 1)
        for dx, weight_x in ((0, 1 - fx), (1, fx)):
            corner_x = x0 + dx
            inside = inside_y & (corner_x >= 0) & (corner_x <= widths - 1)
            # Corners off the map read row 0 with weight 0 (NaN-safe: where, not a product).
            row_y = torch.where(inside, corner_y, 0).to(torch.int64) * widths
            row_x = torch.where(inside, corner_x, 0).to(torch.int64)
            rows = (row_base + row_y + row_x) * m + heads
            weight = torch.where(inside, weight_x * weight_y * attention_weights, 0)
            sampled = rows_of_value.index_select(0, rows.reshape(-1))
            sampled = sampled.view(n, q, m, num_levels * p, d)
            output = output + (sampled * weight.view(n, q, m, num_levels * p, 1)).sum(dim=3)
    return output.view(n, q, m * d)
