"""Any timm network with ``features_only`` support as a Detectron2 backbone."""

import math
from typing import Dict, Sequence

import timm
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import Backbone

__all__ = ["TimmBackbone"]


class TimmBackbone(Backbone):
    """``timm.create_model(model_name, features_only=True, out_indices=...)`` as a Backbone.

    Each selected feature is named after its reduction (stride) taken from timm's
    ``feature_info``: stride ``2**k`` gives ``res{k}`` (4 -> ``res2``, 8 -> ``res3``, 16 -> ``res4``,
    32 -> ``res5``). Channels and strides come from ``feature_info`` too. Outputs are always NCHW,
    also for networks whose timm features are NHWC (Swin, for instance). The spatial size of a
    feature is whatever the network produces, which for odd input sizes is ``ceil(H / stride)``
    for some networks (ResNet) and ``floor(H / stride)`` for others (ConvNeXt).

    Args:
        model_name: a timm model name, e.g. ``"resnet50"`` or ``"convnext_tiny"``.
        out_indices: indices into the network's ``feature_info`` (see ``timm.create_model``); they
            must select features of distinct power-of-two strides.
        pretrained: load timm's pretrained weights (downloads them when not cached).
        in_chans: channels of the input image.
        frozen_bn: replace every BatchNorm by Detectron2's ``FrozenBatchNorm2d``.
        **model_kwargs: further keyword arguments of ``timm.create_model`` (e.g.
            ``drop_path_rate``).
    """

    def __init__(
        self,
        *,
        model_name: str,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained: bool = False,
        in_chans: int = 3,
        frozen_bn: bool = False,
        **model_kwargs,
    ):
        super().__init__()
        self.body = timm.create_model(
            model_name,
            pretrained=pretrained,
            features_only=True,
            out_indices=tuple(out_indices),
            in_chans=in_chans,
            **model_kwargs,
        )
        if frozen_bn:
            self.body = FrozenBatchNorm2d.convert_frozen_batchnorm(self.body)
        self._channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

        info = self.body.feature_info
        strides, channels = info.reduction(), info.channels()
        names = []
        for stride in strides:
            level = round(math.log2(stride))
            if 2**level != stride:
                raise ValueError(f"{model_name}: stride {stride} is not a power of two")
            names.append(f"res{level}")
        if len(set(names)) != len(names):
            raise ValueError(
                f"{model_name} with out_indices {tuple(out_indices)} has strides {strides}; "
                "choose out_indices of distinct strides"
            )
        self._out_features = names
        self._out_feature_channels = dict(zip(names, channels))
        self._out_feature_strides = dict(zip(names, strides))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute the selected features.

        Args:
            x: (N, C, H, W) images.

        Returns:
            dict mapping ``res{k}`` to the (N, channels, H_k, W_k) feature of stride ``2**k``.
        """
        features = self.body(x)
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return dict(zip(self._out_features, features))
