"""ResNet weights in torchvision / mmcv naming, or Detectron2's, mapped to Detectron2's ResNet.

Two namings are understood (keys relative to the ResNet module):

* ``"torchvision"``: ``conv1``, ``bn1``, ``layer{1-4}.{b}.conv{k}`` / ``bn{k}``,
  ``layer{n}.{b}.downsample.{0: conv, 1: norm}``. torchvision's own release, the DINO authors'
  ``backbone.0.body`` (FrozenBatchNorm2d, no ``num_batches_tracked``) and mmcv / EasyCV
  (``BatchNorm2d`` with ``num_batches_tracked``) all use it.
* ``"detectron2"``: ``stem.conv1`` (+ ``.norm``), ``res{2-5}.{b}.conv{k}`` (+ ``.norm``),
  ``res{n}.{b}.shortcut`` (+ ``.norm``), as detrex saves it.

A batch norm maps to Detectron2's ``FrozenBatchNorm2d`` (weight, bias, running mean and variance,
eps 1e-5): in eval mode both compute the same affine function, which is how the detectors use it.
"""

import re
from typing import List, Mapping, Tuple

import torch

from .mapping import ConversionError, Rule

__all__ = [
    "RESNET_NAMINGS",
    "resnet_rules",
    "infer_resnet_depth",
    "RESNET_STAGE_CHANNELS",
    "is_resnet_extra",
]

RESNET_NAMINGS = ("torchvision", "detectron2")

# Bottleneck blocks per stage -> depth. The dino_d2 configs build bottleneck ResNets only (their
# ``stride_in_1x1`` argument does not exist for the basic-block ResNet-18/34).
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

# Output channels of res2..res5.
RESNET_STAGE_CHANNELS = (256, 512, 1024, 2048)


def resnet_rules(source_prefix: str, target_prefix: str, naming: str) -> List[Rule]:
    """Rules from a ResNet under ``source_prefix`` to Detectron2's ResNet under ``target_prefix``.

    Args:
        source_prefix: e.g. ``"backbone.0.body."``, ``"backbone."`` or ``""``.
        target_prefix: e.g. ``"backbone.bottom_up."``.
        naming: one of :data:`RESNET_NAMINGS`.
    """
    s, t = source_prefix, target_prefix
    if naming == "detectron2":
        return [
            Rule(f"{t}stem.conv1.{{p}}", f"{s}stem.conv1.{{p}}"),
            Rule(f"{t}stem.conv1.norm.{{p}}", f"{s}stem.conv1.norm.{{p}}"),
            Rule(f"{t}res{{n}}.{{b}}.{{conv}}.{{p}}", f"{s}res{{n}}.{{b}}.{{conv}}.{{p}}"),
            Rule(
                f"{t}res{{n}}.{{b}}.{{conv}}.norm.{{p}}", f"{s}res{{n}}.{{b}}.{{conv}}.norm.{{p}}"
            ),
        ]
    if naming != "torchvision":
        raise ValueError(f"unknown ResNet naming {naming!r}; known: {RESNET_NAMINGS}")
    rules = [
        Rule(f"{t}stem.conv1.weight", f"{s}conv1.weight"),
        Rule(f"{t}stem.conv1.norm.{{p}}", f"{s}bn1.{{p}}"),
    ]
    for stage in range(1, 5):
        src, dst = f"{s}layer{stage}.{{b}}", f"{t}res{stage + 1}.{{b}}"
        rules += [
            Rule(f"{dst}.shortcut.weight", f"{src}.downsample.0.weight"),
            Rule(f"{dst}.shortcut.norm.{{p}}", f"{src}.downsample.1.{{p}}"),
            Rule(f"{dst}.conv{{k}}.weight", f"{src}.conv{{k}}.weight"),
            Rule(f"{dst}.conv{{k}}.norm.{{p}}", f"{src}.bn{{k}}.{{p}}"),
        ]
    return rules


def is_resnet_extra(key: str) -> bool:
    """Keys of a ResNet checkpoint that Detectron2's ResNet has no use for.

    The batch-norm counters and a classifier (``fc``), for a key relative to the ResNet.
    """
    return key.endswith("num_batches_tracked") or key.startswith("fc.")


def _blocks_per_stage(
    state_dict: Mapping[str, torch.Tensor], prefix: str, naming: str
) -> Tuple[Tuple[int, ...], bool]:
    stage = r"layer(\d)" if naming == "torchvision" else r"res(\d)"
    first = 1 if naming == "torchvision" else 2
    pattern = re.compile(re.escape(prefix) + stage + r"\.(\d+)\.conv(\d)\.weight$")
    blocks = {}
    bottleneck = False
    for key in state_dict:
        found = pattern.match(key)
        if found:
            index = int(found.group(1)) - first
            blocks[index] = max(blocks.get(index, 0), int(found.group(2)) + 1)
            bottleneck |= found.group(3) == "3"
    if sorted(blocks) != [0, 1, 2, 3]:
        raise ConversionError(
            f"no ResNet with four stages under {prefix!r} (found stages {sorted(blocks)})"
        )
    return tuple(blocks[i] for i in range(4)), bottleneck


def infer_resnet_depth(state_dict: Mapping[str, torch.Tensor], prefix: str, naming: str) -> int:
    """Depth (50, 101 or 152) of the bottleneck ResNet under ``prefix``, from its block counts."""
    blocks, bottleneck = _blocks_per_stage(state_dict, prefix, naming)
    depth = _DEPTHS.get(blocks) if bottleneck else None
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConversionError(
            f"the ResNet under {prefix!r} has {list(blocks)} {kind} blocks per stage; dino_d2's "
            f"configs build bottleneck ResNets of depth {sorted(_DEPTHS.values())} only"
        )
    return depth
