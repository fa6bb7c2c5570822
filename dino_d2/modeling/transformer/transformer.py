"""DINO's transformer: encoder, mixed query selection and decoder wired together."""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from dino_d2.layers.box_ops import inverse_sigmoid

from dino_d2.layers.multi_scale_levels import MultiScaleLevels

__all__ = ["DINOTransformer", "DINOTransformerOutput", "HeadOutputs"]


@dataclass
class DINOTransformerOutput:
    """Everything the transformer computed that a head, a loss or an exporter may need.

    Decoder queries are ordered denoising queries first (``num_dn`` of them, 0 in inference),
    then the ``Q`` matching queries. Boxes are normalized cxcywh in [0, 1] relative to each
    image's real (unpadded) size.

    Attributes:
        hidden_states: (L_dec, N, Q_dn + Q, C) normed output of every decoder layer.
        reference_boxes: (L_dec, N, Q_dn + Q, 4) the (detached) box each decoder layer attended
            around.
        pred_logits: (L_dec, N, Q_dn + Q, K) class logits of every decoder layer.
        pred_boxes: (L_dec, N, Q_dn + Q, 4) boxes of every decoder layer.
        memory: (N, S, C) encoder output (padded tokens hold meaningless values).
        levels: the geometry of ``memory``: level shapes, start indices, valid sizes and ratios,
            padding mask.
        enc_logits: (N, Q, K) class logits of the selected encoder proposals.
        enc_boxes: (N, Q, 4) their refined boxes, not detached.
        selected_indices: (N, Q) int64 positions in ``memory`` of the selected proposals.
        enc_states: (N, Q, C) the selected proposals' projected memory, which the encoder heads
            read (not detached).
        num_dn: number of denoising queries at the front of the decoder's query axis.
        extras: per-query outputs of extra heads (``DINO(heads=...)``), by name, each
            (L_dec, N, Q_dn + Q, ...).
        enc_extras: extra heads' outputs for the selected encoder proposals, by name, each
            (N, Q, ...) (see :class:`HeadOutputs`).
        features: the backbone's outputs that are not transformer levels, by name (a neck's
            inputs, e.g. the stride-4 ``res2`` map, (N, C_b, H_b, W_b), each image in the
            top-left of the padded frame); set by the meta-architecture before the heads run.
    """

    hidden_states: Tensor
    reference_boxes: Tensor
    pred_logits: Tensor
    pred_boxes: Tensor
    memory: Tensor
    levels: MultiScaleLevels
    enc_logits: Tensor
    enc_boxes: Tensor
    selected_indices: Tensor
    enc_states: Optional[Tensor] = None
    num_dn: int = 0
    extras: Dict[str, Tensor] = field(default_factory=dict)
    enc_extras: Dict[str, Tensor] = field(default_factory=dict)
    features: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class HeadOutputs:
    """What an extra head returns when it also predicts for the encoder proposals.

    A head may return a plain dict (its ``queries`` outputs only) or this.

    Attributes:
        queries: per decoder query, by name: (L_dec, N, Q_dn + Q, ...), the denoising queries
            first; stored in ``outputs.extras``.
        proposals: per selected encoder proposal, by the same names: (N, Q, ...); stored in
            ``outputs.enc_extras``, where the ``_enc`` loss terms and matching read them.
    """

    queries: Dict[str, Tensor] = field(default_factory=dict)
    proposals: Dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, produced: Union["HeadOutputs", Mapping[str, Tensor]]) -> "HeadOutputs":
        """A head's return value as :class:`HeadOutputs` (a mapping is its ``queries``)."""
        if isinstance(produced, cls):
            return produced
        if not isinstance(produced, Mapping):
            raise TypeError(
                f"a head must return a dict of tensors or HeadOutputs, got {type(produced).__name__}"
            )
        return cls(queries=dict(produced))


class DINOTransformer(nn.Module):
    """The detection transformer of DINO, from multi-scale features to per-layer predictions.

    Flattens the L feature maps into one token sequence (adding the sine position embedding of
    each level's mask and a learned ``level_embed``), encodes it, selects the top-k encoder
    proposals as anchors, prepends the optional denoising queries and decodes.

    Args:
        encoder: a :class:`DeformableEncoder`.
        decoder: a :class:`DeformableDecoder` (owns the per-layer class and box heads); any
            other decoder must have the same call and the attributes ``num_classes`` and
            ``box_logit_eps`` (the clamp of ``inverse_sigmoid`` for boxes taken to logits).
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
        problems = [
            f"decoder ({type(decoder).__name__}) has no attribute {name!r}"
            for name in ("num_classes", "box_logit_eps")
            if not hasattr(decoder, name)
        ]
        if problems:
            raise ValueError("DINOTransformer: " + "; ".join(problems))
        if decoder.num_classes != query_selection.num_classes:
            problems.append(
                f"decoder.num_classes ({decoder.num_classes}) differs from "
                f"query_selection.num_classes ({query_selection.num_classes})"
            )
        embed_width = getattr(position_embedding, "embed_dim", embed_dim)
        if embed_width != embed_dim:
            problems.append(
                f"position_embedding gives {embed_width} channels (num_pos_feats is half of "
                f"it); it must give embed_dim ({embed_dim})"
            )
        if problems:
            raise ValueError("DINOTransformer: " + "; ".join(problems))

    @property
    def num_queries(self) -> int:
        """Number of matching (non-denoising) queries."""
        return self.query_selection.num_queries

    @property
    def num_classes(self) -> int:
        """K, the classes of the decoder's and the query selection's heads."""
        return self.decoder.num_classes

    def forward(
        self,
        features: List[Tensor],
        masks: List[Tensor],
        dn_content: Optional[Tensor] = None,
        dn_boxes: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        refine_queries: Optional[Callable] = None,
    ) -> DINOTransformerOutput:
        """Runs encoder, query selection and decoder.

        Args:
            features: list of L tensors (N, C, H_l, W_l).
            masks: list of L bool tensors (N, H_l, W_l), True on padding; each image's valid
                region is the top-left rectangle.
            dn_content: optional (N, Q_dn, C) denoising content queries.
            dn_boxes: optional (N, Q_dn, 4) denoising boxes, normalized cxcywh in [0, 1]. They are
                taken through ``inverse_sigmoid`` (clamped at the decoder's ``box_logit_eps``,
                1e-3 by default) and back like the authors'
                logit-space inputs, so a padding slot should hold 0.5 (the authors' logit 0).
            attn_mask: optional ((Q_dn + Q), (Q_dn + Q)) bool decoder self-attention mask,
                True = may not attend.
            refine_queries: optional ``f(selected, memory, levels) -> SelectedQueries`` called
                on the query selection's output before decoding (e.g. Mask DINO's anchors from
                the proposals' masks); it may replace ``content`` and ``anchors``.

        Returns:
            A :class:`DINOTransformerOutput`.
        """
        if len(features) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} feature maps and masks, "
                f"got {len(features)} and {len(masks)}"
            )
        src, pos = [], []
        for lvl, (feat, mask) in enumerate(zip(features, masks)):
            level_pos = self.position_embedding(mask).to(feat.dtype)
            src.append(feat.flatten(2).transpose(1, 2))
            pos.append(level_pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src = torch.cat(src, 1)
        pos = torch.cat(pos, 1)
        levels = MultiScaleLevels.from_masks(masks)

        memory = self.encoder(src, pos, levels)
        selected = self.query_selection(memory, levels)
        if refine_queries is not None:
            selected = refine_queries(selected, memory, levels)
        content, anchors = selected.content, selected.anchors
        num_dn = 0
        if dn_content is not None:
            num_dn = dn_content.shape[1]
            content = torch.cat([dn_content, content], 1)
            dn_anchors = inverse_sigmoid(dn_boxes, self.decoder.box_logit_eps)
            anchors = torch.cat([dn_anchors, anchors], 1)
        decoded = self.decoder(content, anchors.sigmoid(), memory, levels, attn_mask)
        return DINOTransformerOutput(
            hidden_states=decoded.hidden_states,
            reference_boxes=decoded.reference_boxes,
            pred_logits=decoded.pred_logits,
            pred_boxes=decoded.pred_boxes,
            memory=memory,
            levels=levels,
            enc_logits=selected.enc_logits,
            enc_boxes=selected.enc_boxes,
            selected_indices=selected.indices,
            enc_states=selected.enc_states,
            num_dn=num_dn,
        )
