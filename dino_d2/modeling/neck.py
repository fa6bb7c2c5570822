"""The neck: maps chosen backbone levels to one width and adds coarser levels.

It wraps a Detectron2 :class:`Backbone` the way Detectron2's FPN does, so channels and strides
come from ``bottom_up.output_shape()`` and a config never restates them.
"""

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.modeling import Backbone

__all__ = ["ChannelMapper"]


def _conv_norm(in_channels, out_channels, kernel_size, stride, num_groups):
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
    )
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(num_groups, out_channels))


class ChannelMapper(Backbone):
    """Projects backbone levels to ``out_channels`` and appends stride-2 levels.

    Each chosen level gets a 1x1 conv + GroupNorm; each extra level a 3x3 stride-2 conv +
    GroupNorm, the first one applied to the coarsest *backbone* feature (not its projection), the
    next ones to the previous extra level, as in DINO and Deformable DETR. Outputs are named
    ``p{log2(stride)}``: res3, res4, res5 and one extra level give p3, p4, p5, p6.
    """

    def __init__(
        self,
        *,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
    ):
        """
        Args:
            bottom_up: the backbone; its ``output_shape()`` must name every entry of in_features.
            in_features: backbone levels to use, finest first (e.g. ``["res3", "res4", "res5"]``).
            out_channels: width of every output level (the transformer's embed_dim).
            num_extra_levels: stride-2 levels added after the coarsest backbone level.
            num_groups: GroupNorm groups; must divide out_channels.
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"ChannelMapper: in_features {missing} are not outputs of the backbone "
                f"(it has {sorted(shapes)})"
            )
        strides = [shapes[f].stride for f in in_features]
        if strides != sorted(strides):
            raise ValueError(
                f"ChannelMapper: in_features {list(in_features)} must go fine to coarse"
            )
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.convs = nn.ModuleList(
            _conv_norm(shapes[f].channels, out_channels, 1, 1, num_groups) for f in in_features
        )
        extra_in = shapes[in_features[-1]].channels
        extra = []
        for _ in range(num_extra_levels):
            extra.append(_conv_norm(extra_in, out_channels, 3, 2, num_groups))
            extra_in = out_channels
        self.extra_convs = nn.ModuleList(extra)

        strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(num_extra_levels)]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: out_channels for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return getattr(self.bottom_up, "padding_constraints", {})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) normalized images.

        Returns:
            dict of output name to (N, out_channels, ceil(H / stride), ceil(W / stride)), and
            the backbone's outputs (its inputs) under their own names (``res2``, ...) for the
            heads that read them (``DINOTransformerOutput.features``).
        """
        features = self.bottom_up(x)
        outputs: List[torch.Tensor] = [
            conv(features[f]) for conv, f in zip(self.convs, self.in_features)
        ]
        last = features[self.in_features[-1]]
        for conv in self.extra_convs:
            last = conv(last)
            outputs.append(last)
        return {**features, **dict(zip(self._out_features, outputs))}
