"""The base of the layouts of trained detectors (:mod:`.dino`, :mod:`.mask_dino`) and the helpers
they share to read a state dict: where a layout keeps the state dict, how it names the backbone,
how the model's sizes are read from it and the :class:`~dino_d2.checkpoint.mapping.Rule` list
that maps every dino_d2 key onto the layout's names.
"""

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .architecture import (
    Architecture,
    DetectorShape,
    infer_swin_architecture,
    match_feature_names,
)
from .classes import select_rows
from .mapping import ConversionError, Rule
from .resnet import RESNET_STAGE_CHANNELS, infer_resnet_depth, resnet_rules

__all__ = [
    "DetectorLayout",
    "TARGET_BACKBONE",
    "all_equal",
    "count_consecutive",
    "layout_indices",
    "level_projections",
    "require_key",
    "rows_rule",
    "transformer_sizes",
]

# Where the dino_d2 detector keeps its backbone's weights.
TARGET_BACKBONE = "backbone.bottom_up."


def layout_indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> List[int]:
    """Sorted distinct values of the ``(\\d+)`` group of ``pattern`` over the keys."""
    compiled = re.compile(pattern)
    found = {int(m.group(1)) for m in map(compiled.match, state_dict) if m}
    return sorted(found)


def count_consecutive(state_dict: Mapping[str, torch.Tensor], pattern: str, what: str) -> int:
    indices = layout_indices(state_dict, pattern)
    if not indices or indices != list(range(len(indices))):
        raise ConversionError(f"found no consecutive {what} (indices {indices})")
    return len(indices)


class DetectorLayout:
    """Base of the layouts of trained DINO detectors.

    Subclasses set the class attributes (``container`` is the top-level key of the state dict,
    ``marker`` a key that identifies the layout, the prefixes locate the backbone) and implement
    ``_shape`` and ``_head_rules``; ``_class_rows`` and ``_read_args`` hold the source's defaults.
    """

    name: str = ""
    container: str = "model"
    top_level: Tuple[str, ...] = ()
    marker: str = ""
    resnet_prefix: str = ""
    resnet_naming: str = "torchvision"
    swin_prefix: str = ""
    resnet_freeze_at: int = 2
    ignored_prefixes: Tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for "known layouts" messages."""
        return (
            f"{self.name}: {{{', '.join(repr(k) for k in self.top_level)}}} with "
            f"{self.marker!r} in {self.container!r}"
        )

    def extract(self, checkpoint: Any, use_ema: bool = False):
        """``(state_dict, args)`` from the loaded file (args None unless the file has them), or
        None when the file is not in this layout."""
        state_dict = checkpoint.get(self.container) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state_dict, Mapping) or self.marker not in state_dict:
            return None
        return dict(state_dict), None

    def backbone_kind(self, state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, str]:
        """``("resnet" | "swin", prefix)`` of the backbone weights."""
        stem = "stem.conv1.weight" if self.resnet_naming == "detectron2" else "conv1.weight"
        if self.resnet_prefix + stem in state_dict:
            return "resnet", self.resnet_prefix
        if f"{self.swin_prefix}patch_embed.proj.weight" in state_dict:
            return "swin", self.swin_prefix
        seen = sorted(k for k in state_dict if k.startswith(self.swin_prefix))[:5]
        raise ConversionError(
            f"the {self.name!r} checkpoint's backbone is neither a ResNet "
            f"({self.resnet_prefix}...) nor a Swin Transformer ({self.swin_prefix}patch_embed...); "
            f"its first keys: {seen}"
        )

    def is_ignored(self, key: str) -> bool:
        """Checkpoint keys that have no counterpart by design (BN counters, loss modules)."""
        return key.endswith(".num_batches_tracked") or key.startswith(self.ignored_prefixes)

    def inspect(
        self,
        state_dict: Mapping[str, torch.Tensor],
        args: Optional[Mapping[str, Any]],
        num_classes: Optional[int],
    ) -> Architecture:
        """Reads the architecture; ``num_classes`` keeps class rows ``0..num_classes-1``."""
        shape = self._shape(state_dict)
        kind, prefix = self.backbone_kind(state_dict)
        if kind == "resnet":
            depth = infer_resnet_depth(state_dict, prefix, self.resnet_naming)
            features = match_feature_names(
                shape.level_widths, list(RESNET_STAGE_CHANNELS), "level projection"
            )
            backbone = {
                "stages.depth": depth,
                "out_features": features,
                "freeze_at": self.resnet_freeze_at,
            }
        else:
            backbone = infer_swin_architecture(state_dict, prefix)
            channels = [backbone["embed_dim"] * 2**i for i in range(len(backbone["depths"]))]
            features = match_feature_names(shape.level_widths, channels, "level projection")
            backbone.update(out_features=features, frozen_stages=-1)
        arch = Architecture(backbone=kind, backbone_values=backbone, detector=shape)
        arch.class_rows = self._class_rows(shape, num_classes, arch.notes)
        self._read_args(args, arch)
        return arch

    def _class_rows(self, shape: DetectorShape, num_classes: Optional[int], notes) -> List[int]:
        if num_classes is None:
            return list(range(shape.class_rows))
        if not 0 < num_classes <= shape.class_rows:
            raise ConversionError(
                f"--num-classes {num_classes} does not fit the checkpoint's {shape.class_rows} "
                "class rows"
            )
        return list(range(num_classes))

    def _read_args(self, args: Optional[Mapping[str, Any]], arch: Architecture) -> None:
        """Fills the values that the weights do not determine (defaults of the source)."""

    def rules(self, arch: Architecture) -> List[Rule]:
        """All rules for a target built from ``arch`` (the Swin backbone is mapped separately)."""
        rules: List[Rule] = []
        if arch.backbone == "resnet":
            rules += resnet_rules(self.resnet_prefix, TARGET_BACKBONE, self.resnet_naming)
        return rules + self._head_rules(arch)

    def _shape(self, state_dict: Mapping[str, torch.Tensor]) -> DetectorShape:
        raise NotImplementedError

    def _head_rules(self, arch: Architecture) -> List[Rule]:
        raise NotImplementedError


def require_key(state_dict: Mapping[str, torch.Tensor], key: str, layout: str) -> torch.Tensor:
    if key not in state_dict:
        raise ConversionError(f"the checkpoint lacks {key!r}, which the {layout!r} layout expects")
    return state_dict[key]


def all_equal(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str]) -> bool:
    first = state_dict[keys[0]]
    return all(torch.equal(first, state_dict[k]) for k in keys[1:])


def rows_rule(target: str, source: str, rows: Sequence[int], aliases=()) -> Rule:
    return Rule(target, source, select_rows(rows), tuple(aliases), note="class rows selected")


def level_projections(
    sd: Mapping[str, torch.Tensor], prefix: str, layout: str
) -> Tuple[List[int], int, int]:
    """``(widths, num_levels, embed_dim)`` of a Deformable-DETR-style state dict whose
    ``{prefix}transformer.level_embed`` and ``{prefix}input_proj.{i}.0`` (1x1 convolutions from
    the backbone's levels, then 3x3 stride-2 ones for the extra levels) hold them; ``widths`` are
    the backbone channels the 1x1 projections take."""
    level_embed = require_key(sd, f"{prefix}transformer.level_embed", layout)
    num_levels, embed_dim = level_embed.shape
    pattern = re.escape(prefix) + r"input_proj\.(\d+)\.0\.weight$"
    projections = count_consecutive(sd, pattern, "input_proj")
    if projections != num_levels:
        raise ConversionError(
            f"{projections} input_proj entries but {num_levels} levels in level_embed"
        )
    convs = [sd[f"{prefix}input_proj.{i}.0.weight"] for i in range(projections)]
    widths = [int(w.shape[1]) for w in convs if w.shape[-1] == 1]
    return widths, int(num_levels), int(embed_dim)


def transformer_sizes(
    sd: Mapping[str, torch.Tensor], encoder: str, decoder: str, layout: str
) -> Dict[str, int]:
    """The sizes of the encoder layers under ``encoder`` and the decoder layers under ``decoder``
    (prefixes ending in ``layers.``), in the authors' names (``linear1``, ``self_attn`` /
    ``cross_attn.sampling_offsets``), as :class:`DetectorShape` fields."""

    def rows(key: str) -> int:
        return int(require_key(sd, key, layout).shape[0])

    layers = r"(\d+)\.linear1\.weight$"
    return {
        "encoder_layers": count_consecutive(sd, re.escape(encoder) + layers, "encoder layers"),
        "decoder_layers": count_consecutive(sd, re.escape(decoder) + layers, "decoder layers"),
        "encoder_ffn": rows(f"{encoder}0.linear1.weight"),
        "decoder_ffn": rows(f"{decoder}0.linear1.weight"),
        "encoder_offsets": rows(f"{encoder}0.self_attn.sampling_offsets.weight"),
        "decoder_offsets": rows(f"{decoder}0.cross_attn.sampling_offsets.weight"),
    }
