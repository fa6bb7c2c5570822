"""The deformable encoder: multi-scale deformable self-attention over all feature tokens.

Tensors are batch-first. The flattened multi-scale sequence ``S = sum_l H_l * W_l`` holds the
levels one after the other, each row-major (see :class:`MultiScaleLevels`). Points are
normalized ``(x, y)`` in [0, 1] relative to the padded feature map, which is what
:class:`MultiScaleDeformableAttention` samples from.
"""

from typing import Any, Optional

import torch
from torch import nn

from dino_d2.layers.deformable_attention import MultiScaleDeformableAttention
from dino_d2.layers.ffn import FFN
from dino_d2.layers.multi_scale_levels import MultiScaleLevels
from dino_d2.layers.precision import inference_activations

from .layer_stack import clone_layers, prototype_layer, run_layer, xavier_init_except

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "get_encoder_reference_points"]


def get_encoder_reference_points(levels: MultiScaleLevels) -> torch.Tensor:
    """Reference points of the encoder tokens: every pixel centre, seen from every level.

    The centre of pixel ``(i, j)`` of level ``l`` is normalized by the valid extent of that level
    and then multiplied by the valid ratio of each level, giving its position on every padded
    map. (Same arithmetic, in the same order, as the DINO authors.)

    Args:
        levels: the geometry of the batch.

    Returns:
        (N, S, L, 2) normalized ``(x, y)``.
    """
    valid_ratios = levels.valid_ratios
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(levels.shapes):
        # Pixel centres i + 0.5 (what the authors' linspace(0.5, h - 0.5, h) gives, bit for bit;
        # arange keeps the sizes symbolic when the model is exported).
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    points = torch.cat(points, 1)
    return points[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU :class:`FFN`.

    ``x = self_attn_norm(x + MSDA(x + pos, x))``, then ``x = ffn(x)``.

    Args:
        embed_dim: channels C.
        num_heads: attention heads (C must be divisible by it).
        ffn_dim: hidden channels of the FFN.
        num_levels: feature levels L.
        num_points: sampling points per head and level.
        dropout: dropout after the attention and inside/after the FFN (0.0 in DINO).

    The arguments are kept as attributes of the same names.
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
        self.ffn = FFN(embed_dim, ffn_dim, dropout)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.ffn_dim = ffn_dim
        self.num_levels = num_levels
        self.num_points = num_points
        self.dropout = dropout
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer's own initialisation, after its sub-modules': xavier on every matrix but
        the deformable attention's."""
        xavier_init_except(self, self.self_attn)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        levels: MultiScaleLevels,
    ) -> torch.Tensor:
        """Runs the layer.

        Args:
            src: (N, S, C) tokens.
            pos: (N, S, C) position (+ level) embedding, added to the attention query only.
            reference_points: (N, S, L, 2) normalized ``(x, y)`` on the padded maps.
            levels: the geometry of the batch (shapes, level starts, padding mask).

        Returns:
            (N, S, C) tokens.
        """
        attn = self.self_attn(
            query=src + pos,
            reference_points=reference_points,
            value=src,
            levels=levels,
        )
        src = self.self_attn_norm(src + self.self_attn_dropout(attn))
        return self.ffn(src)


class DeformableEncoder(nn.Module):
    """A stack of ``num_layers`` :class:`DeformableEncoderLayer` (no final norm, as in DINO).

    Args:
        layer: the prototype layer; the stack holds it and ``num_layers - 1`` deep copies, each
            initialised on its own (:func:`clone_layers`). Its ``embed_dim`` and ``num_levels``
            are the encoder's.
        num_layers: number of layers.
        use_checkpoint: in training mode (with autograd enabled), run every layer under
            ``torch.utils.checkpoint`` to trade compute for activation memory; outputs and
            gradients are unchanged.
        **layer_keywords: deprecated: the layer's keywords (``embed_dim``, ``num_heads``,
            ``ffn_dim``, ``num_levels``, ``num_points``, ``dropout``) given to the stack, as
            before ``layer``; accepted for one release with a DeprecationWarning.
    """

    def __init__(
        self,
        *,
        layer: Optional[DeformableEncoderLayer] = None,
        num_layers: int = 6,
        use_checkpoint: bool = False,
        **layer_keywords: Any,
    ):
        super().__init__()
        layer = prototype_layer(layer, DeformableEncoderLayer, "DeformableEncoder", layer_keywords)
        self.layers = clone_layers(layer, num_layers)
        self.embed_dim = layer.embed_dim
        self.num_levels = layer.num_levels
        self.use_checkpoint = use_checkpoint

    def forward(self, src: torch.Tensor, pos: torch.Tensor, levels: MultiScaleLevels):
        """Encodes the flattened multi-scale tokens.

        Args:
            src: (N, S, C) flattened features.
            pos: (N, S, C) position + level embedding.
            levels: the geometry of the batch.

        Returns:
            (N, S, C) memory. Tokens at padded positions hold meaningless values; tokens at valid
            positions do not depend on them.
        """
        reference_points = get_encoder_reference_points(levels)
        # At inference under autocast the tokens and their residual adds stay in its precision.
        output, pos = inference_activations(src, pos)
        for layer in self.layers:
            output = run_layer(
                layer, output, pos, reference_points, levels, use_checkpoint=self.use_checkpoint
            )
        return output
