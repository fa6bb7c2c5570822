"""Mask DINO's mask head: per-query mask embeddings dotted with the pixel decoder's features."""

from typing import Dict

import torch
from torch import Tensor, nn

from dino_d2.layers.mlp import MLP
from dino_d2.modeling import DINOTransformerOutput, HeadOutputs, MultiScaleLevels

# Where the mask features are left for the head when computed before decoding.
MASK_FEATURES = "mask_features"

__all__ = ["MaskHead"]


class MaskHead(nn.Module):
    """Mask logits for every decoder query and every selected encoder proposal.

    A query's state goes through ``norm`` (Mask DINO's ``decoder_norm``, applied to the decoder's
    already normed output) and the 3-layer ``mask_embed`` MLP; its mask is the dot product of
    that embedding with the mask features at every pixel:
    ``einsum("lbqc,bchw->lbqhw")``. The encoder proposals use their projected memory
    (``outputs.enc_states``) the same way.

    Outputs (name ``mask_logits``), in the padded frame at the mask features' stride (4):
    ``queries`` (L_dec, N, Q_dn + Q, H_4, W_4) in training, and in inference only the last
    layer's, (1, N, Q, H_4, W_4) (the only one inference reads); ``proposals`` (N, Q, H_4, W_4)
    in training.

    Args:
        pixel_decoder: a :class:`MaskPixelDecoder`.
        embed_dim: C, the decoder's width.
    """

    def __init__(self, *, pixel_decoder: nn.Module, embed_dim: int = 256):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.norm = nn.LayerNorm(embed_dim)
        self.mask_embed = MLP(embed_dim, embed_dim, pixel_decoder.mask_dim, 3)

    def mask_features(
        self, memory: Tensor, levels: MultiScaleLevels, features: Dict[str, Tensor]
    ) -> Tensor:
        """The pixel decoder's (N, D, H_4, W_4) mask features, computed once per batch: kept in
        ``features["mask_features"]`` (the backbone's other outputs, which the heads read as
        ``outputs.features``) for a later call."""
        if MASK_FEATURES not in features:
            features[MASK_FEATURES] = self.pixel_decoder(memory, levels, features)
        return features[MASK_FEATURES]

    def predict(self, states: Tensor, mask_features: Tensor) -> Tensor:
        """(..., N, Q, C) query states and (N, D, H, W) mask features -> (..., N, Q, H, W)."""
        embed = self.mask_embed(self.norm(states))
        return torch.einsum("...bqc,bchw->...bqhw", embed, mask_features)

    def forward(self, outputs: DINOTransformerOutput) -> HeadOutputs:
        mask_features = self.mask_features(outputs.memory, outputs.levels, outputs.features)
        if not self.training:
            last = self.predict(outputs.hidden_states[-1:], mask_features)
            return HeadOutputs(queries={"mask_logits": last})
        return HeadOutputs(
            queries={"mask_logits": self.predict(outputs.hidden_states, mask_features)},
            proposals={"mask_logits": self.predict(outputs.enc_states, mask_features)},
        )
