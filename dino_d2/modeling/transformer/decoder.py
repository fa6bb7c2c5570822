"""The deformable decoder with iterative box refinement and look-forward-twice.

Every decoder layer attends to the encoder memory around a 4-d reference box (normalized cxcywh
in [0, 1] relative to the real image), then refines that box. Look-forward-twice (DINO, Sec. 3.5):

* the box *passed on* to layer ``i + 1`` is
  ``b_i = sigmoid(bbox_embed[i](o_i) + inverse_sigmoid(b_{i-1}.detach()))`` with ``o_i`` the raw
  (not normed) output of layer ``i``; layer ``i + 1`` only sees ``b_i.detach()``;
* the box *predicted* by layer ``i`` (the one its loss sees) is
  ``sigmoid(bbox_embed[i](norm(o_i)) + inverse_sigmoid(b_{i-1}))`` with ``b_{i-1}`` NOT detached,
  so the loss of layer ``i`` also trains ``bbox_embed[i - 1]``; ``b_{-1}`` is the initial box.

Both follow the DINO authors' code exactly, including the quirk that the refinement uses the
un-normed output while the prediction uses the normed one (so the predicted box of a layer is
not the box handed to the next layer).
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dino_d2.layers.box_ops import inverse_sigmoid
from dino_d2.layers.deformable_attention import MultiScaleDeformableAttention
from dino_d2.layers.ffn import FFN
from dino_d2.layers.mlp import MLP
from dino_d2.layers.multi_scale_levels import MultiScaleLevels
from dino_d2.layers.position_encoding import get_sine_pos_embed
from dino_d2.layers.precision import in_float32, inference_activations

from .layer_stack import clone_layers, prototype_layer, run_layer, xavier_init_except

__all__ = [
    "DecoderOutput",
    "DeformableDecoderLayer",
    "DeformableDecoder",
    "build_class_head",
    "build_box_head",
]


@dataclass
class DecoderOutput:
    """What every decoder layer produced, stacked over the layers (queries in input order).

    Attributes:
        hidden_states: (num_layers, N, Q, C) output of each layer after the decoder's final
            ``norm`` (what the heads read).
        reference_boxes: (num_layers, N, Q, 4) the box each layer attended around, normalized
            cxcywh relative to the real image, detached.
        pred_logits: (num_layers, N, Q, K) class logits of each layer.
        pred_boxes: (num_layers, N, Q, 4) boxes predicted by each layer, normalized cxcywh.
    """

    hidden_states: Tensor
    reference_boxes: Tensor
    pred_logits: Tensor
    pred_boxes: Tensor


def build_class_head(embed_dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear(embed_dim, num_classes) with the focal-loss prior bias ``-log((1 - p) / p)``."""
    head = nn.Linear(embed_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def build_box_head(embed_dim: int) -> MLP:
    """MLP(embed_dim, embed_dim, 4, 3) whose last layer is zero, so it starts as the identity
    refinement (a zero offset in logit space)."""
    head = MLP(embed_dim, embed_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, ReLU :class:`FFN`.

    Each sub-block is ``x = norm(x + dropout(block(x)))``; the attention norms are named after
    their block (``self_attn_norm``, ``cross_attn_norm``), the FFN keeps its own (``ffn.norm``). The query position embedding is added
    to the queries and keys of self-attention (not the values) and to the query of
    cross-attention; the memory gets no position embedding.

    Args:
        embed_dim: channels C.
        num_heads: heads of both attentions.
        ffn_dim: hidden channels of the FFN.
        num_levels: feature levels L.
        num_points: sampling points per head and level.
        dropout: dropout of the self-attention weights and after every sub-block (0.0 in DINO).

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
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(embed_dim)
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
        xavier_init_except(self, self.cross_attn)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        levels: MultiScaleLevels,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Runs the layer.

        Args:
            query: (N, Q, C) content queries.
            query_pos: (N, Q, C) query position embedding.
            reference_points: (N, Q, L, 4) boxes, normalized cxcywh on each padded map (already
                multiplied by the valid ratios).
            memory: (N, S, C) encoder output.
            levels: the geometry of the memory (shapes, level starts, padding mask).
            attn_mask: optional (Q, Q) bool self-attention mask, True = may not attend.

        Returns:
            (N, Q, C) queries.
        """
        q = k = query + query_pos
        attn = self.self_attn(q, k, query, attn_mask=attn_mask, need_weights=False)[0]
        query = self.self_attn_norm(query + self.self_attn_dropout(attn))
        attn = self.cross_attn(
            query=query + query_pos,
            reference_points=reference_points,
            value=memory,
            levels=levels,
        )
        query = self.cross_attn_norm(query + self.cross_attn_dropout(attn))
        return self.ffn(query)


class DeformableDecoder(nn.Module):
    """DINO's decoder: layers, query position head, final norm and the per-layer heads.

    Attributes:
        layers: ``num_layers`` :class:`DeformableDecoderLayer`.
        ref_point_head: MLP(2C, C, C, 2) mapping the sine embedding of the 4-d reference box
            (:func:`get_sine_pos_embed`, C/2 channels per coordinate, temperature 10000) to the
            query position embedding.
        norm: LayerNorm applied to every layer's output before the heads.
        class_embed: ModuleList of ``num_layers`` Linear(C, num_classes).
        bbox_embed: ModuleList of ``num_layers`` MLP(C, C, 4, 3).

    Args:
        num_classes: K, the rows of the class heads.
        layer: the prototype layer; the stack holds it and ``num_layers - 1`` deep copies, each
            initialised on its own (:func:`clone_layers`). Its ``embed_dim`` C is the decoder's
            and must be divisible by 4 (sine embedding of 4 coordinates into 2C).
        num_layers: number of layers.
        share_heads: True (the authors): every slot of ``class_embed`` / ``bbox_embed`` holds the
            same module. False (detrex): independent copies, identical at initialization.
        prior_prob: focal-loss prior of the class-head bias.
        scale_query_pos_by_valid_ratio: True (the authors and detrex): the reference box is
            multiplied by the first level's valid ratio before its sine embedding, so a query's
            position embedding is in padded-image coordinates and depends on how much padding
            the batch adds. False: the embedding is computed from the box relative to the real
            image, which makes batched inference equal to single-image inference. The two agree
            whenever there is no padding.
        box_logit_eps: the clamp of ``inverse_sigmoid`` where a layer's box is taken back to
            logit space (and the denoising boxes are, in the transformer): 1e-3 as the DINO
            authors; Mask DINO's authors clamp at 1e-5, which matters for its mask-derived anchors
            that lie on the image border.
        use_checkpoint: in training mode (with autograd enabled), run every layer under
            ``torch.utils.checkpoint``; outputs and gradients are unchanged.
        **layer_keywords: deprecated: the layer's keywords (``embed_dim``, ``num_heads``,
            ``ffn_dim``, ``num_levels``, ``num_points``, ``dropout``) given to the stack, as
            before ``layer``; accepted for one release with a DeprecationWarning.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        layer: Optional[DeformableDecoderLayer] = None,
        num_layers: int = 6,
        share_heads: bool = True,
        prior_prob: float = 0.01,
        scale_query_pos_by_valid_ratio: bool = True,
        box_logit_eps: float = 1e-3,
        use_checkpoint: bool = False,
        **layer_keywords: Any,
    ):
        super().__init__()
        layer = prototype_layer(layer, DeformableDecoderLayer, "DeformableDecoder", layer_keywords)
        embed_dim = layer.embed_dim
        if embed_dim % 4:
            raise ValueError(f"the layer's embed_dim must be divisible by 4, got {embed_dim}")
        self.layers = clone_layers(layer, num_layers)
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        for layer in self.ref_point_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        self.norm = nn.LayerNorm(embed_dim)

        class_head = build_class_head(embed_dim, num_classes, prior_prob)
        box_head = build_box_head(embed_dim)
        if share_heads:
            self.class_embed = nn.ModuleList([class_head] * num_layers)
            self.bbox_embed = nn.ModuleList([box_head] * num_layers)
        else:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_layers))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_layers))

        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.share_heads = share_heads
        self.scale_query_pos_by_valid_ratio = scale_query_pos_by_valid_ratio
        self.box_logit_eps = box_logit_eps
        self.use_checkpoint = use_checkpoint

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        levels: MultiScaleLevels,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """Decodes the queries and predicts a class and a box with every layer.

        Args:
            query: (N, Q, C) initial content queries.
            reference_boxes: (N, Q, 4) the reference box of the first layer, normalized cxcywh in
                [0, 1] relative to each image's real size. Gradients flow into the layer-0
                prediction only (through look-forward-twice), never into the attention.
            memory: (N, S, C) encoder output.
            levels: the geometry of the memory (shapes, level starts, valid sizes, padding).
            attn_mask: optional (Q, Q) bool self-attention mask, True = may not attend.

        Returns:
            A :class:`DecoderOutput` with one entry per layer.
        """
        # (N, 1, L, 4): a box relative to the real image, times these, is on each padded map.
        valid_ratios = levels.valid_ratios
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        # box: (N, Q, 4) the reference box of the current layer, normalized cxcywh in [0, 1]
        # relative to each image's real size. The layer attends around box.detach() (scaled onto
        # each level's padded map), and its query position embeds it. box keeps its gradient for
        # look-forward-twice: the layer predicts sigmoid(bbox_embed(hs) + box_logit), with
        # box_logit = inverse_sigmoid(box), and hands the next layer its refinement of box.
        box = reference_boxes
        # At inference under autocast the queries and their residual adds stay in its precision.
        (output,) = inference_activations(query)
        hidden, boxes_attended, all_logits, all_boxes = [], [], [], []
        for i, layer in enumerate(self.layers):
            box_on_maps = box.detach()[:, :, None] * ratios
            if self.scale_query_pos_by_valid_ratio:
                query_pos = get_sine_pos_embed(box_on_maps[:, :, 0], self.embed_dim // 2)
            else:
                query_pos = get_sine_pos_embed(box.detach(), self.embed_dim // 2)
            output = run_layer(
                layer,
                output,
                self.ref_point_head(query_pos),
                box_on_maps,
                memory,
                levels,
                attn_mask,
                use_checkpoint=self.use_checkpoint,
            )
            hs = self.norm(output)
            hidden.append(hs)
            boxes_attended.append(box.detach())
            all_logits.append(self.class_embed[i](hs))
            # The box refinement runs in float32 under autocast (dino_d2.layers.precision).
            box_logit = inverse_sigmoid(box, self.box_logit_eps)
            all_boxes.append((in_float32(self.bbox_embed[i], hs) + box_logit).sigmoid())
            if i + 1 < self.num_layers:
                box = (in_float32(self.bbox_embed[i], output) + box_logit.detach()).sigmoid()
        return DecoderOutput(
            hidden_states=torch.stack(hidden),
            reference_boxes=torch.stack(boxes_attended),
            pred_logits=torch.stack(all_logits),
            pred_boxes=torch.stack(all_boxes),
        )
