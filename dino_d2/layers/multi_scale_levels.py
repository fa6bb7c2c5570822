"""The geometry of a padded batch's multi-scale token sequence, computed once per forward pass.

The L feature maps of a batch are flattened level after level (each row-major) into one
sequence of ``S = sum_l H_l * W_l`` tokens. Every image's real content is the top-left
rectangle of each padded map; the rest is padding. :class:`MultiScaleLevels` holds what the
multi-scale deformable attention (:mod:`dino_d2.layers.deformable_attention`) needs to read
that sequence: the level shapes, where each level starts, the padding mask and the valid ratios.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["LevelShapes", "MultiScaleLevels", "level_index_tensors", "valid_extent"]

# L pairs (H_l, W_l) of Python ints, or SymInts while exporting with dynamic sizes.
LevelShapes = Sequence[Tuple[int, int]]


def level_index_tensors(
    level_shapes: LevelShapes, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes`` and ``level_start_index`` from L pairs (H_l, W_l).

    The pairs may be SymInts (e.g. ``feature.shape[-2:]`` while exporting with dynamic sizes):
    ``torch.tensor`` records them symbolically, while ``torch.as_tensor`` would specialize them to
    the traced sizes.

    Args:
        level_shapes: L pairs (H_l, W_l) of Python ints or SymInts.
        device: device of the returned tensors.

    Returns:
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64 start of each level in the flattened S axis.
    """
    spatial_shapes = torch.tensor(
        [[h, w] for h, w in level_shapes], dtype=torch.int64, device=device
    )
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return spatial_shapes, level_start_index


def valid_extent(mask: Tensor) -> Tensor:
    """Number of valid (non-padding) columns and rows of each image of a padded map.

    Args:
        mask: (N, H, W) bool, True on padding; the valid region is the top-left rectangle.

    Returns:
        (N, 2) float32 ``(valid_width, valid_height)``, counted along the first row and column.
    """
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w, valid_h], -1).float()


@dataclass
class MultiScaleLevels:
    """Where each level sits in the flattened sequence and how much of it is real.

    Attributes:
        shapes: ``(H_l, W_l)`` of every level as Python integers (symbolic integers when the
            model is traced for export), for code that loops over levels.
        spatial_shapes: (L, 2) int64 ``(H_l, W_l)``, for the deformable attention kernels.
        level_start_index: (L,) int64 offset of each level in the sequence.
        valid_sizes: (N, L, 2) float32 ``(valid_width, valid_height)`` of each image on each
            level, in cells.
        padding_mask: (N, S) bool, True on padded tokens.
        padded: whether any token is padding (True whenever that is not known without looking
            at the data: while compiling or exporting).
    """

    shapes: List[Tuple[int, int]]
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_sizes: Tensor
    padding_mask: Tensor
    padded: bool = True

    @classmethod
    def from_masks(cls, masks: Sequence[Tensor]) -> "MultiScaleLevels":
        """Builds the geometry from one (N, H_l, W_l) bool padding mask per level."""
        shapes = [(mask.shape[-2], mask.shape[-1]) for mask in masks]
        spatial_shapes, level_start_index = level_index_tensors(shapes, masks[0].device)
        padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        return cls(
            shapes=shapes,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_sizes=torch.stack([valid_extent(mask) for mask in masks], 1),
            padding_mask=padding_mask,
            padded=traced or bool(padding_mask.any()),
        )

    @property
    def value_padding_mask(self) -> Optional[Tensor]:
        """``padding_mask`` for the attention to zero padded values, or None when there is no
        padding (which saves a pass over every attention's values)."""
        return self.padding_mask if self.padded else None

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def valid_ratios(self) -> Tensor:
        """(N, L, 2) float32 ``(valid_width / W_l, valid_height / H_l)``."""
        return self.valid_sizes / self.spatial_shapes.flip(-1).to(self.valid_sizes.dtype)
