"""The deformable encoder: multi-scale deformable self-attention over all feature tokens.

Tensors are batch-first. The flattened multi-scale sequence ``S = sum_l H_l * W_l`` holds the
levels one after the other, each row-major. Points are normalized ``(x, y)`` in [0, 1] relative
to the padded feature map, which is what :class:`MultiScaleDeformableAttention` samples from.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dino_d2.layers.ms_deform_attn import MultiScaleDeformableAttention

__all__ = [
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "get_valid_ratio",
    "get_encoder_reference_points",
]


def _xavier_init_except(module: nn.Module, skip: nn.Module) -> None:
    """Xavier-uniform init of every matrix of ``module`` outside ``skip`` (which inits itself).

    This is the DINO authors' scheme: xavier on all parameters with more than one dimension, the
    deformable attention keeping its own initialization, biases and norms left at their defaults.
    """
    skipped = {id(p) for p in skip.parameters()}
    for p in module.parameters():
        if p.dim() > 1 and id(p) not in skipped:
            nn.init.xavier_uniform_(p)


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each padded feature map covered by the real image.

    Args:
        mask: (N, H, W) bool, True on padding; the valid region is the top-left rectangle.

    Returns:
        (N, 2) float32 ``(valid_width / W, valid_height / H)``, counted along the first row and
        column.
    """
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def get_encoder_reference_points(
    spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor
) -> torch.Tensor:
    """Reference points of the encoder tokens: every pixel centre, seen from every level.

    The centre of pixel ``(i, j)`` of level ``l`` is normalized by the valid extent of that level
    and then multiplied by the valid ratio of each level, giving its position on every padded
    map. (Same arithmetic, in the same order, as the DINO authors.)

    Args:
        spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
        valid_ratios: (N, L, 2) from :func:`get_valid_ratio`.

    Returns:
        (N, S, L, 2) normalized ``(x, y)``.
    """
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    points = torch.cat(points, 1)
    return points[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN.

    ``x = self_attn_norm(x + MSDA(x + pos, x))``, then
    ``x = ffn_norm(x + linear2(dropout(relu(linear1(x)))))``.

    Args:
        embed_dim: channels C.
        num_heads: attention heads (C must be divisible by it).
        ffn_dim: hidden channels of the FFN.
        num_levels: feature levels L.
        num_points: sampling points per head and level.
        dropout: dropout after the attention and inside/after the FFN (0.0 in DINO).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_out_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        _xavier_init_except(self, self.self_attn)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the layer.

        Args:
            src: (N, S, C) tokens.
            pos: (N, S, C) position (+ level) embedding, added to the attention query only.
            reference_points: (N, S, L, 2) normalized ``(x, y)`` on the padded maps.
            spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
            level_start_index: (L,) int64 offset of each level in S.
            padding_mask: (N, S) bool, True on padding.

        Returns:
            (N, S, C) tokens.
        """
        attn = self.self_attn(
            query=src + pos,
            reference_points=reference_points,
            value=src,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            value_padding_mask=padding_mask,
        )
        src = self.self_attn_norm(src + self.self_attn_dropout(attn))
        ffn = self.linear2(self.ffn_dropout(F.relu(self.linear1(src))))
        return self.ffn_norm(src + self.ffn_out_dropout(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` (no final norm, as in DINO).

    Args:
        num_layers: number of layers.
        embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout: passed to every layer.
        use_checkpoint: in training mode (with autograd enabled), run every layer under
            ``torch.utils.checkpoint`` to trade compute for activation memory; outputs and
            gradients are unchanged.
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                num_levels=num_levels,
                num_points=num_points,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.use_checkpoint = use_checkpoint

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Encodes the flattened multi-scale tokens.

        Args:
            src: (N, S, C) flattened features.
            pos: (N, S, C) position + level embedding.
            spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
            level_start_index: (L,) int64.
            valid_ratios: (N, L, 2) ``(w, h)`` fraction of each map that is not padding.
            padding_mask: (N, S) bool, True on padding.

        Returns:
            (N, S, C) memory. Tokens at padded positions hold meaningless values; tokens at valid
            positions do not depend on them.
        """
        reference_points = get_encoder_reference_points(spatial_shapes, valid_ratios)
        output = src
        run_checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            args = (output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            if run_checkpointed:
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
        return output
