"""ViTDet's simple feature pyramid, on any Detectron2 version.

A plain ViT gives one stride-16 map. ViTDet (Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection", arXiv 2203.16527) builds a pyramid from that single map alone:
stride-2 deconvolutions for the finer levels, max pooling for the coarser ones, then a 1x1 and a
3x3 convolution with LayerNorm per level. Detectron2 main has it as
``detectron2.modeling.backbone.vit.SimpleFeaturePyramid``; v0.6 has not, so dino_d2 has its own.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import Backbone
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["SimplePyramid"]


def _norm(norm: str, channels: int) -> Optional[nn.Module]:
    """A channels-first LayerNorm for ``"LN"``, else Detectron2's ``get_norm`` (v0.6 has no LN)."""
    if norm == "LN":
        return LayerNorm2d(channels)
    return get_norm(norm, channels)


def _exponent(scale: float) -> int:
    """k such that ``scale == 2**k``, or a ValueError."""
    exponent = round(math.log2(scale)) if scale > 0 else None
    if exponent is None or 2.0**exponent != scale:
        raise ValueError(f"SimplePyramid: scale factor {scale} is not a power of two")
    return exponent


class SimplePyramid(Backbone):
    """Pyramid levels made from one feature of ``net`` by resampling, as in ViTDet.

    For each scale factor ``s`` (a power of two, largest first) the input feature of stride
    ``S`` gives a level of stride ``S / s`` named ``p{log2(S / s)}``: ``s = 2**k`` applies ``k``
    stride-2 transposed convolutions (each halving the channels, with norm and GELU between
    them), ``s = 1`` keeps the map, ``s = 2**-k`` applies ``k`` 2x2 max poolings. Every level
    then gets a 1x1 convolution to ``out_channels`` and a 3x3 convolution, each followed by the
    norm. With a stride-16 ViT, ``scale_factors=(2.0, 1.0, 0.5)`` gives p3, p4, p5 (strides
    8/16/32); ViTDet's ``(4.0, 2.0, 1.0, 0.5)`` adds p2.

    Channels and strides come from ``net.output_shape()`` and are declared through the
    ``_out_feature_*`` attributes that Detectron2's ``Backbone.output_shape()`` reads.
    ``size_divisibility`` is the coarsest stride (and a multiple of the net's own stride and
    divisibility): inputs padded to it, as Detectron2 models and DINO pad them, give every level
    exactly ``H / stride x W / stride``.

    Args:
        net: the backbone giving the single feature, e.g. a ViT.
        in_feature: the name of that feature among ``net.output_shape()``.
        out_channels: channels of every level.
        scale_factors: resampling factors, strictly decreasing (finest level first).
        norm: ``"LN"`` (channels-first LayerNorm, as ViTDet), ``""`` for none (the convolutions
            then get biases), or any name Detectron2's ``get_norm`` knows (``"GN"``, ``"BN"``).
    """

    def __init__(
        self,
        *,
        net: Backbone,
        in_feature: str,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (2.0, 1.0, 0.5),
        norm: str = "LN",
    ):
        super().__init__()
        shapes = net.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"SimplePyramid: in_feature {in_feature!r} is not an output of the net "
                f"(it has {sorted(shapes)})"
            )
        scale_factors = [float(s) for s in scale_factors]
        if not scale_factors or any(a <= b for a, b in zip(scale_factors, scale_factors[1:])):
            raise ValueError(
                f"SimplePyramid: scale_factors must be non-empty and strictly decreasing, "
                f"got {scale_factors}"
            )
        in_channels, in_stride = shapes[in_feature].channels, shapes[in_feature].stride
        if not isinstance(in_stride, int) or in_stride < 1 or in_stride & (in_stride - 1):
            raise ValueError(
                f"SimplePyramid: the stride {in_stride} of {in_feature!r} is not a power of two"
            )
        exponents = [_exponent(s) for s in scale_factors]
        if 2 ** exponents[0] > in_stride:
            raise ValueError(
                f"SimplePyramid: scale factor {scale_factors[0]} would go below stride 1 from "
                f"the stride-{in_stride} feature {in_feature!r}"
            )
        if in_channels % 2 ** max(exponents[0], 0):
            raise ValueError(
                f"SimplePyramid: {in_channels} channels cannot be halved {exponents[0]} times "
                f"for scale factor {scale_factors[0]}"
            )

        self.net = net
        self.in_feature = in_feature
        strides = [in_stride // 2**k if k >= 0 else in_stride * 2**-k for k in exponents]
        names = [f"p{round(math.log2(s))}" for s in strides]
        self.levels = nn.ModuleDict(
            (name, self._level(k, in_channels, out_channels, norm))
            for name, k in zip(names, exponents)
        )
        self._out_features = names
        self._out_feature_strides = dict(zip(names, strides))
        self._out_feature_channels = {name: out_channels for name in names}
        self._size_divisibility = math.lcm(strides[-1], in_stride, max(net.size_divisibility, 1))

    @staticmethod
    def _level(exponent: int, channels: int, out_channels: int, norm: str) -> nn.Sequential:
        layers: List[nn.Module] = []
        for i in range(exponent):
            if i > 0:
                between = _norm(norm, channels)
                layers += ([] if between is None else [between]) + [nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
            channels //= 2
        layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-exponent)]
        bias = not norm
        layers.append(Conv2d(channels, out_channels, 1, bias=bias, norm=_norm(norm, out_channels)))
        layers.append(
            Conv2d(
                out_channels,
                out_channels,
                3,
                padding=1,
                bias=bias,
                norm=_norm(norm, out_channels),
            )
        )
        return nn.Sequential(*layers)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute the pyramid.

        Args:
            x: (N, C, H, W) images; H and W multiples of ``size_divisibility``.

        Returns:
            dict mapping each ``p{k}`` (finest first) to its (N, out_channels, H / 2**k,
            W / 2**k) map.
        """
        feature = self.net(x)[self.in_feature]
        return {name: level(feature) for name, level in self.levels.items()}
