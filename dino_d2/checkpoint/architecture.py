"""What a checkpoint says about the model that produced it, in the terms of dino_d2's configs.

Shapes and key counts decide everything they can (widths, depths, numbers of layers, levels,
queries and classes, the Swin variant); what weights cannot tell (attention heads vs. sampling
points, position-embedding constants, backbone freezing) comes from the authors' saved ``args``
or from the documented defaults of each source. :meth:`Architecture.config_values` turns the result
into config keys and values, from which :mod:`dino_d2.checkpoint.convert` derives the overrides.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from dino_d2.modeling.backbone.swin_presets import SWIN_PRESETS

from .mapping import ConversionError

__all__ = [
    "Architecture",
    "DetectorShape",
    "infer_swin_architecture",
    "match_feature_names",
    "swin_preset_name",
]

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
_SWIN_ARCH_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "pretrain_img_size")


def infer_swin_architecture(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, Any]:
    """SwinBackbone arguments (embed_dim, depths, num_heads, window_size, pretrain_img_size).

    Read from a Swin state dict in Microsoft's / the detection layout under ``prefix``. The
    pre-training size is not stored in the weights; the released models pair window 12 with 384
    and window 7 with 224, and so does this function (timm only records it).
    """
    proj = state_dict.get(f"{prefix}patch_embed.proj.weight")
    if proj is None:
        raise ConversionError(f"no Swin patch embedding {prefix + 'patch_embed.proj.weight'!r}")
    block = re.compile(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.")
    depths: Dict[int, int] = {}
    for key in state_dict:
        found = block.match(key)
        if found:
            stage, index = int(found.group(1)), int(found.group(2))
            depths[stage] = max(depths.get(stage, 0), index + 1)
    if not depths or sorted(depths) != list(range(len(depths))):
        raise ConversionError(f"no Swin stages under {prefix!r} (found {sorted(depths)})")
    heads, windows = [], set()
    for stage in range(len(depths)):
        table = state_dict[f"{prefix}layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        windows.add((math.isqrt(table.shape[0]) + 1) // 2)
    if len(windows) != 1:
        raise ConversionError(f"the Swin stages use different windows {sorted(windows)}")
    window = windows.pop()
    return dict(
        embed_dim=int(proj.shape[0]),
        depths=[depths[s] for s in range(len(depths))],
        num_heads=heads,
        window_size=window,
        pretrain_img_size=384 if window == 12 else 224,
    )


def swin_preset_name(swin: Mapping[str, Any]) -> Optional[str]:
    """The :data:`SWIN_PRESETS` entry with this architecture, or None."""
    for name, preset in SWIN_PRESETS.items():
        if all(list(_as_list(preset[k])) == list(_as_list(swin[k])) for k in _SWIN_ARCH_KEYS):
            return name
    return None


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def match_feature_names(widths: List[int], stage_channels: List[int], what: str) -> List[str]:
    """Backbone feature names with these channels, e.g. [512, 1024, 2048] -> res3, res4, res5."""
    names = []
    for i, width in enumerate(widths):
        if width not in stage_channels:
            raise ConversionError(
                f"{what} {i} takes {width} channels, but the backbone's res2..res5 give "
                f"{list(stage_channels)}"
            )
        names.append(FEATURE_NAMES[stage_channels.index(width)])
    if names != sorted(names) or len(set(names)) != len(names):
        raise ConversionError(f"{what} widths {widths} are not backbone levels from fine to coarse")
    return names


@dataclass
class DetectorShape:
    """Sizes of a DINO detector read from its state dict (everything but the backbone).

    Attributes:
        level_widths: input channels of each projection of a backbone level (neck / input_proj).
        num_levels: levels of the transformer (``level_embed`` rows).
        embed_dim: transformer width.
        encoder_layers, decoder_layers: numbers of layers.
        encoder_ffn, decoder_ffn: FFN hidden widths.
        encoder_offsets, decoder_offsets: output rows of ``sampling_offsets``
            (heads x levels x points x 2).
        num_queries: rows of the learned content queries.
        class_rows: rows of the class heads in the checkpoint.
        label_rows: rows of the denoising label embedding in the checkpoint.
        share_heads: whether the decoder heads are one module shared by all layers.
    """

    level_widths: List[int]
    num_levels: int
    embed_dim: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    encoder_offsets: int
    decoder_offsets: int
    num_queries: int
    class_rows: int
    label_rows: int
    share_heads: bool


@dataclass
class Architecture:
    """A checkpoint's model in config terms.

    Attributes:
        backbone: ``"resnet"`` or ``"swin"``.
        backbone_values: backbone config values (keys relative to ``model.backbone.bottom_up``).
        detector: the detector sizes, or None for a backbone-only checkpoint.
        num_heads: (encoder, decoder) attention heads when the checkpoint records them, else
            None (the config's value is assumed, and the sampling points follow from it).
        class_rows: source rows of the target's contiguous classes, in order (detectors only).
        values: further config values (keys relative to ``model``), e.g. position embedding,
            denoising, ``num_select``.
        notes: facts the user should know (assumptions made, parts that were initialized).
        family: ``"dino"``, or ``"maskdino"`` for a Mask DINO checkpoint (its shipped configs).
    """

    backbone: str
    backbone_values: Dict[str, Any]
    detector: Optional[DetectorShape] = None
    num_heads: Optional[Tuple[int, int]] = None
    class_rows: Optional[List[int]] = None
    values: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    family: str = "dino"

    @property
    def num_levels(self) -> Optional[int]:
        return self.detector.num_levels if self.detector else None

    def default_config(self) -> str:
        """The shipped config closest to this architecture (fewest overrides)."""
        five = self.num_levels == 5
        if self.family == "maskdino":
            if self.backbone == "resnet":
                return "maskdino_r50_4scale_50ep.py"
            return "maskdino_swin_large_384_5scale_50ep.py"
        if self.backbone == "resnet":
            if self.backbone_values.get("stages.depth") == 101 and not five:
                return "dino_r101_4scale_12ep.py"
            return "dino_r50_5scale_12ep.py" if five else "dino_r50_4scale_12ep.py"
        preset = swin_preset_name(self.backbone_values)
        if preset in ("large", "large_384"):
            return f"dino_swin_large_384_{'5' if five else '4'}scale_12ep.py"
        if preset in ("base", "base_384"):
            return "dino_swin_base_384_4scale_12ep.py"
        if preset == "small":
            return "dino_swin_small_224_4scale_12ep.py"
        return "dino_swin_tiny_224_4scale_12ep.py"

    def config_values(self, config_heads: Tuple[int, int]) -> Dict[str, Any]:
        """Config key -> value for everything the checkpoint determines.

        Args:
            config_heads: (encoder, decoder) heads of the target config, used when the
                checkpoint does not record them.

        Raises:
            ConversionError: when the sampling offsets do not split into heads x levels x points.
        """
        values = {f"model.backbone.bottom_up.{k}": v for k, v in self.backbone_values.items()}
        shape = self.detector
        if shape is None:
            return values
        heads = self.num_heads or config_heads
        points = []
        for part, rows, num_heads in zip(
            ("encoder", "decoder"), (shape.encoder_offsets, shape.decoder_offsets), heads
        ):
            per_point = 2 * num_heads * shape.num_levels
            if rows % per_point:
                raise ConversionError(
                    f"the {part}'s sampling_offsets have {rows} rows, which is not 2 x {num_heads} "
                    f"heads x {shape.num_levels} levels x points; the checkpoint does not record "
                    f"its heads, so pass a config whose {part} has the right num_heads"
                )
            points.append(rows // per_point)
        backbone_levels = len(shape.level_widths)
        values.update(
            {
                "model.num_classes": len(self.class_rows),
                "model.backbone.num_extra_levels": shape.num_levels - backbone_levels,
                "model.transformer.num_levels": shape.num_levels,
                "model.transformer.embed_dim": shape.embed_dim,
                "model.transformer.position_embedding.num_pos_feats": shape.embed_dim // 2,
                "model.transformer.encoder.num_layers": shape.encoder_layers,
                "model.transformer.encoder.layer.num_heads": heads[0],
                "model.transformer.encoder.layer.ffn_dim": shape.encoder_ffn,
                "model.transformer.encoder.layer.num_points": points[0],
                "model.transformer.decoder.num_layers": shape.decoder_layers,
                "model.transformer.decoder.layer.num_heads": heads[1],
                "model.transformer.decoder.layer.ffn_dim": shape.decoder_ffn,
                "model.transformer.decoder.layer.num_points": points[1],
                "model.transformer.decoder.share_heads": shape.share_heads,
                "model.transformer.query_selection.num_queries": shape.num_queries,
            }
        )
        values.update({f"model.{k}": v for k, v in self.values.items()})
        return values
