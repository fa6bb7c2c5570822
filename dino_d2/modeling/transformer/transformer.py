"""DINO's transformer: encoder, mixed query selection and decoder wired together."""

import torch
from torch import nn

from dino_d2.layers.box_ops import inverse_sigmoid

from .encoder import get_valid_ratio

__all__ = ["DINOTransformer"]


class DINOTransformer(nn.Module):
    """The detection transformer of DINO, from multi-scale features to per-layer predictions.

    Flattens the L feature maps into one token sequence (adding the sine position embedding of
    each level's mask and a learned ``level_embed``), encodes it, selects the top-k encoder
    proposals as anchors, prepends the optional denoising queries and decodes.

    Args:
        encoder: a :class:`DeformableEncoder`.
        decoder: a :class:`DeformableDecoder` (owns the per-layer class and box heads).
        query_selection: a :class:`MixedQuerySelection` (owns the encoder heads and the learned
            content queries).
        position_embedding: a :class:`PositionEmbeddingSine` whose output has ``embed_dim``
            channels.
        num_levels: L.
        embed_dim: C.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        query_selection: nn.Module,
        position_embedding: nn.Module,
        num_levels: int = 4,
        embed_dim: int = 256,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.query_selection = query_selection
        self.position_embedding = position_embedding
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        nn.init.normal_(self.level_embed)
        self.num_levels = num_levels
        self.embed_dim = embed_dim

    @property
    def num_queries(self) -> int:
        """Number of matching (non-denoising) queries."""
        return self.query_selection.num_queries

    def forward(self, features, masks, dn_content=None, dn_boxes=None, attn_mask=None):
        """Runs encoder, query selection and decoder.

        Args:
            features: list of L tensors (N, C, H_l, W_l).
            masks: list of L bool tensors (N, H_l, W_l), True on padding; each image's valid
                region is the top-left rectangle.
            dn_content: optional (N, Q_dn, C) denoising content queries.
            dn_boxes: optional (N, Q_dn, 4) denoising boxes, normalized cxcywh in [0, 1]. They are
                taken through ``inverse_sigmoid`` (clamped at 1e-3) and back like the authors'
                logit-space inputs, so a padding slot should hold 0.5 (the authors' logit 0).
            attn_mask: optional ((Q_dn + Q), (Q_dn + Q)) bool decoder self-attention mask,
                True = may not attend.

        Returns:
            dict with
            ``pred_logits``: (num_decoder_layers, N, Q_dn + Q, K) class logits, DN queries first;
            ``pred_boxes``: (num_decoder_layers, N, Q_dn + Q, 4) normalized cxcywh;
            ``enc_logits``: (N, Q, K) class logits of the selected encoder proposals;
            ``enc_boxes``: (N, Q, 4) their refined boxes, normalized cxcywh, not detached.
        """
        if len(features) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} feature maps and masks, "
                f"got {len(features)} and {len(masks)}"
            )
        src, pos, padding_mask, shapes = [], [], [], []
        for lvl, (feat, mask) in enumerate(zip(features, masks)):
            shapes.append(feat.shape[-2:])
            level_pos = self.position_embedding(mask).to(feat.dtype)
            src.append(feat.flatten(2).transpose(1, 2))
            pos.append(level_pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
            padding_mask.append(mask.flatten(1))
        src = torch.cat(src, 1)
        pos = torch.cat(pos, 1)
        padding_mask = torch.cat(padding_mask, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(
            src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask
        )
        content, anchors, enc_logits, enc_boxes = self.query_selection(
            memory, padding_mask, spatial_shapes
        )
        if dn_content is not None:
            content = torch.cat([dn_content, content], 1)
            anchors = torch.cat([inverse_sigmoid(dn_boxes), anchors], 1)
        pred_logits, pred_boxes = self.decoder(
            content,
            anchors.sigmoid(),
            memory,
            padding_mask,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            attn_mask,
        )
        return {
            "pred_logits": pred_logits,
            "pred_boxes": pred_boxes,
            "enc_logits": enc_logits,
            "enc_boxes": enc_boxes,
        }
