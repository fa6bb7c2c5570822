"""Swin Transformer as a Detectron2 backbone, built on timm's implementation.

The numerics follow the Swin detection code that the DINO authors use
(``models/dino/swin_transformer.py``, itself from Swin-Transformer-Object-Detection), so that their
released Swin checkpoints give the same features:

* the image is zero-padded on the right/bottom to a multiple of the patch size, and every map is
  ``ceil(H / stride) x ceil(W / stride)``;
* every block pads its (normalized) map to a multiple of the window *before* the cyclic shift and
  builds the shifted-window mask on the padded grid. timm shifts first and pads afterwards, which
  mixes real and padded tokens differently whenever a map is not a multiple of the window (the usual
  case for detection inputs), so the blocks are switched to :class:`_PadThenShiftBlock`;
* the window size and the half-window shift are kept at every stage, even when a map is smaller
  than one window (timm's ``always_partition=True``);
* each output stage has its own LayerNorm (the authors' ``norm{i}``, here ``out_norms.res{i+2}``).
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import Backbone
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn

from .swin_presets import SWIN_PRESETS

__all__ = ["SWIN_PRESETS", "SwinBackbone"]


class _PadThenShiftBlock(SwinTransformerBlock):
    """timm's Swin block with the window attention of the Swin detection code.

    Only ``_attn`` changes: the map is padded to whole windows first, then rolled, and the
    shifted-window mask is computed for the padded, rolled grid. Parameters, buffers and the rest
    of the block (residuals, MLP, drop path) are timm's.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention on normalized tokens.

        Args:
            x: (N, H, W, C) tokens after ``norm1``.

        Returns:
            (N, H, W, C) attention output, before drop path and residual.
        """
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        shift_h, shift_w = self.shift_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]

        shifted = shift_h > 0 or shift_w > 0
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
            mask = self.get_attn_mask(x)

        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=mask)
        windows = windows.view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)

        if shifted:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class SwinBackbone(Backbone):
    """Swin Transformer producing Detectron2 features ``res2``..``res5``.

    Stage ``i`` (0-based) gives ``res{i+2}`` with stride ``patch_size * 2**i`` (4/8/16/32) and
    ``embed_dim * 2**i`` channels. Stages after the last requested feature are not built. Input
    images may have any size; they are padded internally and every output is cropped to
    ``ceil(H / stride) x ceil(W / stride)`` (the padding is at the bottom/right, so pixel (0, 0)
    stays at feature (0, 0)).

    Submodules: ``swin`` (timm ``SwinTransformer`` without head and final norm; stage ``i`` starts
    with the patch merging that the Microsoft checkpoints keep at the end of stage ``i-1``),
    ``pos_drop`` and ``out_norms`` (a LayerNorm per output feature). Released weights are converted
    with :func:`dino_d2.checkpoint.swin.convert_swin_checkpoint`.

    Args:
        embed_dim: channels of the first stage; doubled at every later stage.
        depths: number of blocks per stage.
        num_heads: attention heads per stage; ``embed_dim * 2**i`` must be divisible by them.
        window_size: side of the square attention window, the same at every stage.
        pretrain_img_size: image size of the pre-training, only recorded in timm's bookkeeping
            (no absolute position embedding is used, as in every released DINO Swin model).
        patch_size: side of the square patches of the patch embedding.
        in_chans: channels of the input image.
        mlp_ratio: hidden width of the block MLPs over the block width.
        qkv_bias: whether the query/key/value projection has a bias.
        drop_rate: dropout after the patch embedding and in the attention projection and MLPs.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth rate of the last block, linear from 0 over all blocks.
        out_features: names of the returned features, any of ``res2``..``res5``.
        frozen_stages: the authors' convention. -1 freezes nothing; 0 and 1 freeze the patch
            embedding; ``k >= 2`` also freezes the first ``k - 1`` stages, each with the patch
            merging that follows it. Frozen parts get ``requires_grad=False`` and stay in eval mode.
        use_checkpoint: recompute every block in the backward pass (timm's gradient
            checkpointing) to save activation memory; the results are unchanged.
    """

    # Read by dino_d2.export before tracing: padding every block to the window size makes
    # torch.export's symbolic sizes blow up (an export with dynamic sizes did not finish in 20
    # minutes).
    export_limitation = (
        "pads every block's input to a multiple of the window size, which torch.export cannot "
        "trace with dynamic image sizes (the export does not finish); export a config with a "
        "ResNet or RegNet backbone"
    )

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        widths = [embed_dim * 2**i for i in range(num_stages)]
        for width, heads in zip(widths, num_heads):
            if width % heads != 0:
                raise ValueError(f"stage width {width} is not divisible by {heads} heads")
        names = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [name for name in out_features if name not in names]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {names}, got {out_features}"
            )
        if not -1 <= frozen_stages <= num_stages + 1:
            raise ValueError(
                f"frozen_stages must be in [-1, {num_stages + 1}], got {frozen_stages}"
            )

        stages = sorted(names.index(name) for name in out_features)
        self.swin = SwinTransformer(
            img_size=pretrain_img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        # Drop the final norm, the head and the stages after the last output: no unused parameters.
        self.swin.prune_intermediate_layers(stages, prune_norm=True, prune_head=True)
        # timm shifts before padding to whole windows; the released weights expect the opposite.
        for stage in self.swin.layers:
            for block in stage.blocks:
                block.__class__ = _PadThenShiftBlock
        self.swin.set_grad_checkpointing(use_checkpoint)
        self.pos_drop = nn.Dropout(drop_rate)

        self.patch_size = patch_size
        self._out_features = [names[i] for i in stages]
        self._out_feature_channels = {names[i]: widths[i] for i in stages}
        self._out_feature_strides = {names[i]: patch_size * 2**i for i in stages}
        self.out_norms = nn.ModuleDict({names[i]: nn.LayerNorm(widths[i]) for i in stages})

        self._frozen_modules = self._select_frozen_modules(frozen_stages)
        for name in self._frozen_modules:
            self.get_submodule(name).requires_grad_(False)
        self.train(self.training)

    def _select_frozen_modules(self, frozen_stages: int) -> Tuple[str, ...]:
        """Names of the submodules that ``frozen_stages`` freezes (see the class docstring)."""
        num_built = len(self.swin.layers)
        frozen: List[str] = []
        if frozen_stages >= 0:
            frozen.append("swin.patch_embed")
        if frozen_stages >= 2:
            frozen.append("pos_drop")
            for i in range(frozen_stages - 1):
                if i < num_built:
                    frozen.append(f"swin.layers.{i}.blocks")
                if i + 1 < num_built:
                    frozen.append(f"swin.layers.{i + 1}.downsample")
        return tuple(frozen)

    def train(self, mode: bool = True) -> "SwinBackbone":
        """Set the training mode; frozen parts always stay in eval mode."""
        super().train(mode)
        for name in self._frozen_modules:
            self.get_submodule(name).train(False)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute the requested features.

        Args:
            x: (N, C, H, W) images of any size.

        Returns:
            dict mapping each name of ``out_features`` to its (N, embed_dim * 2**i,
            ceil(H / stride), ceil(W / stride)) feature map, ``i`` being the stage index.
        """
        height, width = x.shape[-2:]
        x = F.pad(x, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        x = self.pos_drop(self.swin.patch_embed(x))
        outputs = {}
        for i, stage in enumerate(self.swin.layers):
            x = stage(x)
            name = f"res{i + 2}"
            if name in self.out_norms:
                outputs[name] = self.out_norms[name](x).permute(0, 3, 1, 2).contiguous()
        return outputs
