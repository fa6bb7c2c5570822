"""Builders of checkpoints in the other code bases' layouts, for the converter tests.

Each builder writes a dino_d2 state dict under the names (and extra rows, aliases and counters) of
one source, spelled out here independently of the converter, after the reference code:
IDEA-Research/DINO models/dino/{dino,deformable_transformer,backbone}.py, detrex
projects/dino/modeling + detrex/layers + detrex/modeling/neck, and EasyCV's dino_head.py.
Converting the result must give back the dino_d2 state dict exactly.
"""

import re

import torch
from detectron2.config import LazyConfig, instantiate

from dino_d2.checkpoint import load_config
from dino_d2.checkpoint.classes import coco_category_ids

# A small transformer on a real ResNet-50: everything converts as for the released models.
SMALL = [
    "model.transformer.embed_dim=32",
    "model.transformer.position_embedding.num_pos_feats=16",
    "model.transformer.encoder.num_layers=2",
    "model.transformer.decoder.num_layers=3",
    "model.transformer.encoder.layer.ffn_dim=48",
    "model.transformer.decoder.layer.ffn_dim=40",
    "model.transformer.query_selection.num_queries=12",
]


def build_model(overrides=(), config="dino_r50_4scale_12ep.py", seed=0):
    """A dino_d2 model with random weights everywhere (norms and FrozenBN statistics included)."""
    cfg = load_config(config)
    LazyConfig.apply_overrides(cfg, list(overrides))
    torch.manual_seed(seed)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0.0, 0.2)
                if name.endswith("norm.weight"):
                    tensor.add_(1.0)
    return model


def torchvision_resnet_name(key):
    """Detectron2 ResNet key (relative to the ResNet) -> torchvision name."""
    key = key.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
    key = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = key.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return re.sub(r"conv(\d)\.norm\.", r"bn\1.", key)


def swin_detection_name(key):
    """SwinBackbone key (relative to it) -> the Swin detection layout of the authors / detrex.

    The detection code keeps each patch merging at the end of its stage (timm at the start of the
    next one) and one LayerNorm ``norm{i}`` per output stage.
    """
    found = re.match(r"out_norms\.res(\d)\.(.+)$", key)
    if found:
        return f"norm{int(found.group(1)) - 2}.{found.group(2)}"
    key = key[len("swin.") :]
    found = re.match(r"layers\.(\d+)\.downsample\.(.+)$", key)
    if found:
        return f"layers.{int(found.group(1)) - 1}.downsample.{found.group(2)}"
    return key


def backbone_name(key, resnet_name):
    """Name of a ``backbone.bottom_up.`` key (relative) in a source: Swin or ResNet naming."""
    if key.startswith(("swin.", "out_norms.")):
        return swin_detection_name(key)
    return resnet_name(key)


def _embed_rows(value, rows, total, generator, cache):
    """A (total, ...) tensor with ``value``'s rows at ``rows`` and random rows elsewhere.

    Tensors sharing memory (the heads a model shares between layers) get the same result, as in
    the authors' files, where the shared head is one tensor saved under several names.
    """
    if value.data_ptr() not in cache:
        out = torch.randn((total,) + tuple(value.shape[1:]), generator=generator)
        out[torch.as_tensor(rows)] = value
        cache[value.data_ptr()] = out
    return cache[value.data_ptr()]


def authors_state_dict(state, *, head="", backbone=None, coco=True, counters=False):
    """The authors' layout (``head=""``) or EasyCV's (``head="head."``, ``backbone="backbone."``).

    Class heads get 91 rows indexed by COCO id when ``coco`` (else the same rows), the label
    embedding one spare row more, shared heads are registered twice (top level and under
    ``transformer.decoder``), batch norms get ``num_batches_tracked`` when ``counters``. The
    backbone goes under ``backbone`` (default: the authors' ``backbone.0.body.`` for a ResNet,
    ``backbone.0.`` for a Swin).
    """
    if backbone is None:
        swin = any(k.startswith("backbone.bottom_up.swin.") for k in state)
        backbone = "backbone.0." if swin else "backbone.0.body."
    generator, cache = torch.Generator().manual_seed(1), {}
    num_classes = state["denoising.label_enc.weight"].shape[0]
    rows = coco_category_ids() if coco else list(range(num_classes))
    total = 91 if coco else num_classes
    backbone_levels = len({k.split(".")[2] for k in state if k.startswith("backbone.convs.")})
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.bottom_up."):
            name = backbone + backbone_name(
                key[len("backbone.bottom_up.") :], torchvision_resnet_name
            )
            if counters and name.endswith("running_mean"):
                out[name.replace("running_mean", "num_batches_tracked")] = torch.tensor(1000)
        elif key.startswith("backbone.convs."):
            name = "input_proj." + key[len("backbone.convs.") :]
        elif key.startswith("backbone.extra_convs."):
            index, rest = key[len("backbone.extra_convs.") :].split(".", 1)
            name = f"input_proj.{backbone_levels + int(index)}.{rest}"
        elif key.startswith("transformer.encoder.layers."):
            name = (
                key.replace(".self_attn_norm.", ".norm1.")
                .replace(".ffn.norm.", ".norm2.")
                .replace(".ffn.linear", ".linear")
            )
        elif key.startswith("transformer.decoder.layers."):
            name = (
                key.replace(".self_attn_norm.", ".norm2.")
                .replace(".cross_attn_norm.", ".norm1.")
                .replace(".ffn.norm.", ".norm3.")
                .replace(".ffn.linear", ".linear")
            )
        elif key.startswith(
            ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
        ):
            if ".class_embed." in key:
                value = _embed_rows(value, rows, total, generator, cache)
            out[head + key] = value
            name = key[len("transformer.decoder.") :]
        elif key.startswith("transformer.query_selection."):
            rest = key[len("transformer.query_selection.") :]
            if rest.startswith("class_embed."):
                value = _embed_rows(value, rows, total, generator, cache)
                rest = rest.replace("class_embed.", "enc_out_class_embed.")
            rest = rest.replace("bbox_embed.", "enc_out_bbox_embed.")
            name = "transformer." + rest
        elif key == "denoising.label_enc.weight":
            value = _embed_rows(value, rows, total + 1, generator, cache)
            name = "label_enc.weight"
        else:
            name = key
        out[(head if not name.startswith("backbone") else "") + name] = value
    return out


def detrex_state_dict(state):
    """detrex's layout: Detectron2 ResNet, ChannelMapper neck, detrex layers, 7 heads."""
    num_decoder_layers = len(
        {k.split(".")[3] for k in state if k.startswith("transformer.decoder.layers.")}
    )
    encoder = {
        "self_attn.": "attentions.0.",
        "self_attn_norm.": "norms.0.",
        "ffn.norm.": "norms.1.",
        "ffn.linear1.": "ffns.0.layers.0.0.",
        "ffn.linear2.": "ffns.0.layers.1.",
    }
    decoder = {
        "self_attn.": "attentions.0.attn.",
        "cross_attn.": "attentions.1.",
        "self_attn_norm.": "norms.0.",
        "cross_attn_norm.": "norms.1.",
        "ffn.norm.": "norms.2.",
        "ffn.linear1.": "ffns.0.layers.0.0.",
        "ffn.linear2.": "ffns.0.layers.1.",
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.bottom_up."):
            name = "backbone." + backbone_name(key[len("backbone.bottom_up.") :], str)
        elif key.startswith(("backbone.convs.", "backbone.extra_convs.")):
            parts[0] = "neck"
            parts[3] = {"0": "conv", "1": "norm"}[parts[3]]
            name = ".".join(parts)
        elif key == "transformer.level_embed":
            name = "transformer.level_embeds"
        elif key.startswith(("transformer.encoder.layers.", "transformer.decoder.layers.")):
            table = encoder if parts[1] == "encoder" else decoder
            head, rest = ".".join(parts[:4]) + ".", ".".join(parts[4:])
            for ours, theirs in table.items():
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours) :]
                    break
            name = head + rest
        elif key.startswith(
            ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
        ):
            out[key] = value
            name = key[len("transformer.decoder.") :]
        elif key.startswith("transformer.query_selection."):
            rest = key[len("transformer.query_selection.") :]
            if rest.startswith(("class_embed.", "bbox_embed.")):
                kind, rest = rest.split(".", 1)
                out[f"transformer.decoder.{kind}.{num_decoder_layers}.{rest}"] = value
                name = f"{kind}.{num_decoder_layers}.{rest}"
            else:
                name = "transformer." + rest
        elif key == "denoising.label_enc.weight":
            name = "label_enc.weight"
        else:
            name = key
        out[name] = value
    return out
