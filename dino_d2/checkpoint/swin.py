"""Convert released Swin Transformer weights to :class:`~dino_d2.modeling.backbone.SwinBackbone`.

Accepted layouts (keys relative to the Swin module, i.e. any ``backbone.0.`` prefix removed):

* Microsoft's ImageNet checkpoints (``{"model": state_dict}`` or the bare state dict):
  ``patch_embed.{proj,norm}``, ``layers.{s}.blocks.{b}.*``, ``layers.{s}.downsample.{reduction,norm}``
  at the end of stage ``s``, final ``norm``, ``head``, and the buffers
  ``relative_position_index`` / ``attn_mask``;
* the Swin detection layout of the DINO authors and of Detectron2/detrex: the same plus one
  LayerNorm ``norm{i}`` per output stage, without ``head`` and ``norm``;
* timm's own layout (the patch merging already at the start of the next stage).
"""

import re
from typing import Dict, List, Mapping, Tuple

import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from dino_d2.modeling.backbone.swin import SwinBackbone

__all__ = ["convert_swin_checkpoint"]

_OUT_NORM = re.compile(r"^norm(\d+)\.(weight|bias)$")
_STAGE = re.compile(r"^layers\.(\d+)\.")


def _stage_of(key: str) -> int:
    """Stage index of a ``layers.{s}.`` key, -1 for other keys."""
    match = _STAGE.match(key)
    return int(match.group(1)) if match else -1


def convert_swin_checkpoint(
    state_dict: Mapping[str, torch.Tensor], backbone: SwinBackbone
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map a Swin state dict onto the keys of ``backbone``.

    The classification head and the final norm are dropped, and so are the stages and per-stage
    norms that ``backbone`` does not build (its ``out_features`` decide that). Persistent buffers of
    the original code (``relative_position_index``, ``attn_mask``) are dropped; timm recomputes them.
    timm's ``checkpoint_filter_fn`` moves each patch merging to the start of the next stage and
    resizes relative position tables (and the patch embedding) when ``backbone`` uses another window
    (patch) size than the checkpoint.

    Args:
        state_dict: weights in one of the layouts of the module docstring.
        backbone: the backbone the weights are meant for; only its keys and shapes are read.

    Returns:
        ``(converted, missing)``: ``converted`` is keyed like ``backbone.state_dict()`` and loads
        with ``backbone.load_state_dict(converted, strict=False)``; ``missing`` lists, sorted, the
        backbone keys the checkpoint does not provide (the ``out_norms`` for an ImageNet checkpoint).

    Raises:
        ValueError: for checkpoint keys that have no place in ``backbone`` (e.g. the absolute
            position embedding of ``ape=True`` models, which SwinBackbone does not support).
    """
    if "model" in state_dict:
        state_dict = state_dict["model"]
    num_stages = len(backbone.swin.layers)
    out_norms: Dict[str, torch.Tensor] = {}
    swin_weights: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        out_norm = _OUT_NORM.match(key)
        if out_norm:
            name = f"res{int(out_norm.group(1)) + 2}"
            if name in backbone.out_norms:
                out_norms[f"out_norms.{name}.{out_norm.group(2)}"] = value
        elif key.startswith(("head.", "norm.")):
            continue
        elif ".blocks." in key and _stage_of(key) >= num_stages:
            continue
        else:
            swin_weights[key] = value

    converted = {
        f"swin.{key}": value
        for key, value in checkpoint_filter_fn(swin_weights, backbone.swin).items()
        if _stage_of(key) < num_stages
    }
    converted.update(out_norms)

    expected = backbone.state_dict()
    unexpected = sorted(key for key in converted if key not in expected)
    if unexpected:
        raise ValueError(f"checkpoint keys without a place in the Swin backbone: {unexpected}")
    missing = sorted(key for key in expected if key not in converted)
    return converted, missing
