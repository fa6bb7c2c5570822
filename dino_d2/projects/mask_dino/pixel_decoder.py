"""Mask DINO's pixel decoder: the encoder memory at its finest level, fused with a backbone map.

DINO's deformable encoder is Mask DINO's multi-scale pixel encoder. The mask features are made
FPN-style: the memory's finest level is upsampled (bilinear) to the backbone's stride-4 map
(``res2``), added to that map's lateral projection, passed through a 3x3 conv and projected by a
1x1 conv to ``mask_dim`` channels.
"""

from typing import Dict

import torch.nn.functional as F
from fvcore.nn import weight_init
from torch import Tensor, nn

from detectron2.layers import Conv2d

from dino_d2.modeling import MultiScaleLevels

__all__ = ["MaskPixelDecoder"]


class MaskPixelDecoder(nn.Module):
    """Mask features from the encoder memory and one backbone map.

    Args:
        in_channels: channels of the backbone map ``feature``.
        embed_dim: C, the memory's width (the transformer's ``embed_dim``).
        mask_dim: channels of the mask features.
        feature: name of the backbone output to fuse (``outputs.features[feature]``; a neck
            returns its inputs there), stride 4 in Mask DINO.
        num_groups: GroupNorm groups of the lateral and output convs.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        embed_dim: int = 256,
        mask_dim: int = 256,
        feature: str = "res2",
        num_groups: int = 32,
    ):
        super().__init__()
        self.lateral = Conv2d(
            in_channels, embed_dim, 1, bias=False, norm=nn.GroupNorm(num_groups, embed_dim)
        )
        self.output = Conv2d(
            embed_dim,
            embed_dim,
            3,
            padding=1,
            bias=False,
            norm=nn.GroupNorm(num_groups, embed_dim),
            activation=F.relu,
        )
        self.mask_features = Conv2d(embed_dim, mask_dim, 1)
        for conv in (self.lateral, self.output, self.mask_features):
            weight_init.c2_xavier_fill(conv)
        self.feature = feature
        self.mask_dim = mask_dim

    def forward(
        self, memory: Tensor, levels: MultiScaleLevels, features: Dict[str, Tensor]
    ) -> Tensor:
        """
        Args:
            memory: (N, S, C) the encoder output, levels finest first.
            levels: its geometry.
            features: the backbone's other outputs, with ``self.feature`` (N, C_in, H_4, W_4)
                (``DINOTransformerOutput.features``).

        Returns:
            (N, mask_dim, H_4, W_4) mask features, each image in the top-left of the padded
            frame like the backbone map.
        """
        if self.feature not in features:
            raise KeyError(
                f"MaskPixelDecoder reads the backbone output '{self.feature}', which the "
                f"backbone does not return (it returns {sorted(features)} beside the "
                "transformer levels); add it to the backbone's out_features"
            )
        height, width = levels.shapes[0]
        n, _, channels = memory.shape
        finest = memory[:, : height * width].transpose(1, 2).reshape(n, channels, height, width)
        x = self.lateral(features[self.feature])
        x = x + F.interpolate(finest, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(x))
