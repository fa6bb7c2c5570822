"""Tests of the Swin backbone and of the Swin checkpoint converter (small models, CPU)."""

import importlib.util
import math
import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from dino_d2.checkpoint.swin import convert_swin_checkpoint
from dino_d2.modeling.backbone import SWIN_PRESETS, SwinBackbone, add_swin_config

ALL_FEATURES = ("res2", "res3", "res4", "res5")


def small_swin_kwargs(preset, **overrides):
    """A preset's window and heads with 4 channels per head and 2 blocks per stage."""
    kwargs = dict(SWIN_PRESETS[preset])
    kwargs.update(
        embed_dim=4 * kwargs["num_heads"][0],
        depths=(2, 2, 2, 2),
        drop_path_rate=0.0,
        out_features=ALL_FEATURES,
    )
    kwargs.update(overrides)
    return kwargs


def small_swin(preset="tiny", **overrides):
    torch.manual_seed(0)
    return SwinBackbone(**small_swin_kwargs(preset, **overrides))


@pytest.mark.parametrize("preset", ["tiny", "base_384"])
@pytest.mark.parametrize("size", [(64, 96), (70, 101), (13, 7)])
def test_outputs_match_output_shape(preset, size):
    backbone = small_swin(preset).eval()
    height, width = size
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, height, width))
    shapes = backbone.output_shape()
    assert list(outputs) == list(shapes) == list(ALL_FEATURES)
    embed_dim = backbone.out_norms["res2"].normalized_shape[0]
    for i, name in enumerate(ALL_FEATURES):
        stride = 4 * 2**i
        assert shapes[name] == ShapeSpec(channels=embed_dim * 2**i, stride=stride)
        expected = (2, embed_dim * 2**i, math.ceil(height / stride), math.ceil(width / stride))
        assert outputs[name].shape == expected


def test_presets_are_the_released_architectures():
    assert SWIN_PRESETS["tiny"]["depths"] == (2, 2, 6, 2)
    assert SWIN_PRESETS["small"]["depths"] == (2, 2, 18, 2)
    assert SWIN_PRESETS["base_384"]["embed_dim"] == 128
    assert SWIN_PRESETS["base_384"]["num_heads"] == (4, 8, 16, 32)
    assert SWIN_PRESETS["large_384"]["embed_dim"] == 192
    assert SWIN_PRESETS["large_384"]["num_heads"] == (6, 12, 24, 48)
    assert SWIN_PRESETS["large_384"]["window_size"] == 12
    assert SWIN_PRESETS["large_384"]["pretrain_img_size"] == 384


@pytest.mark.parametrize("out_features", [ALL_FEATURES, ("res2", "res4")])
def test_gradient_reaches_every_parameter(out_features):
    backbone = small_swin(out_features=out_features).train()
    assert len(backbone.swin.layers) == int(out_features[-1][-1]) - 1
    outputs = backbone(torch.randn(1, 3, 40, 52))
    assert list(outputs) == list(out_features)
    sum(output.square().mean() for output in outputs.values()).backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_batched_equals_single():
    backbone = small_swin().eval()
    images = torch.randn(3, 3, 45, 67)
    with torch.no_grad():
        batched = backbone(images)
        for i in range(len(images)):
            single = backbone(images[i : i + 1])
            for name in ALL_FEATURES:
                torch.testing.assert_close(batched[name][i : i + 1], single[name])


def test_checkpointing_gives_same_outputs_and_gradients(monkeypatch):
    reference = small_swin(drop_path_rate=0.3).train()
    checkpointed = small_swin(drop_path_rate=0.3, use_checkpoint=True).train()
    checkpointed.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 38, 45)

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    results = []
    for backbone in (reference, checkpointed):
        calls.clear()
        torch.manual_seed(1)
        outputs = backbone(images)
        sum(output.square().mean() for output in outputs.values()).backward()
        grads = {n: p.grad for n, p in backbone.named_parameters()}
        results.append((outputs, grads, len(calls)))

    (ref_out, ref_grads, ref_calls), (ckpt_out, ckpt_grads, ckpt_calls) = results
    assert ref_calls == 0
    assert ckpt_calls == 8  # one per block
    for name in ALL_FEATURES:
        torch.testing.assert_close(ckpt_out[name], ref_out[name])
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_frozen_stages_follow_the_authors_convention():
    backbone = small_swin(frozen_stages=2).train()
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    frozen_prefixes = ("swin.patch_embed.", "swin.layers.0.blocks.", "swin.layers.1.downsample.")
    assert frozen == {n for n, _ in backbone.named_parameters() if n.startswith(frozen_prefixes)}
    assert frozen
    assert not backbone.swin.layers[0].blocks.training
    assert not backbone.swin.layers[1].downsample.training
    assert backbone.swin.layers[1].blocks.training
    backbone.eval().train()
    assert not backbone.swin.patch_embed.training


@pytest.mark.parametrize(
    "overrides",
    [dict(out_features=("res6",)), dict(out_features=()), dict(num_heads=(5, 6, 12, 24))],
)
def test_invalid_arguments_raise(overrides):
    with pytest.raises(ValueError):
        small_swin(**overrides)


def test_yacs_builder():
    cfg = get_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.EMBED_DIM = 12
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.SWIN.OUT_FEATURES = ["res4", "res5"]
    backbone = build_backbone(cfg)
    assert isinstance(backbone, SwinBackbone)
    assert backbone.output_shape() == {
        "res4": ShapeSpec(channels=48, stride=16),
        "res5": ShapeSpec(channels=96, stride=32),
    }


def test_lazy_config_with_preset():
    cfg = L(SwinBackbone)(**SWIN_PRESETS["base_384"])
    cfg.embed_dim = 16
    cfg.depths = (1, 1, 1, 1)
    cfg.out_features = ("res3", "res5")
    backbone = instantiate(cfg)
    assert backbone.output_shape()["res5"] == ShapeSpec(channels=128, stride=32)
    assert backbone.swin.layers[0].blocks[0].window_size == (12, 12)


def microsoft_state_dict(*, embed_dim, depths, num_heads, window_size, num_classes=5):
    """Random weights named and shaped like Microsoft's Swin ImageNet checkpoints."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    table = (2 * window_size - 1) ** 2
    area = window_size**2
    state = {
        "patch_embed.proj.weight": rand(embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": rand(embed_dim),
        "patch_embed.norm.weight": rand(embed_dim),
        "patch_embed.norm.bias": rand(embed_dim),
    }
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2**s
        for b in range(depth):
            prefix = f"layers.{s}.blocks.{b}."
            state.update(
                {
                    prefix + "norm1.weight": rand(dim),
                    prefix + "norm1.bias": rand(dim),
                    prefix + "attn.relative_position_bias_table": rand(table, heads),
                    prefix + "attn.relative_position_index": torch.zeros(area, area).long(),
                    prefix + "attn.qkv.weight": rand(3 * dim, dim),
                    prefix + "attn.qkv.bias": rand(3 * dim),
                    prefix + "attn.proj.weight": rand(dim, dim),
                    prefix + "attn.proj.bias": rand(dim),
                    prefix + "norm2.weight": rand(dim),
                    prefix + "norm2.bias": rand(dim),
                    prefix + "mlp.fc1.weight": rand(4 * dim, dim),
                    prefix + "mlp.fc1.bias": rand(4 * dim),
                    prefix + "mlp.fc2.weight": rand(dim, 4 * dim),
                    prefix + "mlp.fc2.bias": rand(dim),
                }
            )
            if b % 2 == 1:
                state[prefix + "attn_mask"] = torch.zeros(4, area, area)
        if s < len(depths) - 1:
            state[f"layers.{s}.downsample.reduction.weight"] = rand(2 * dim, 4 * dim)
            state[f"layers.{s}.downsample.norm.weight"] = rand(4 * dim)
            state[f"layers.{s}.downsample.norm.bias"] = rand(4 * dim)
    last = embed_dim * 2 ** (len(depths) - 1)
    state.update(
        {
            "norm.weight": rand(last),
            "norm.bias": rand(last),
            "head.weight": rand(num_classes, last),
            "head.bias": rand(num_classes),
        }
    )
    return state


ARCH = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=2)


def backbone_key(microsoft_key):
    """Where a Microsoft key must land in SwinBackbone (None for dropped keys)."""
    parts = microsoft_key.split(".")
    if parts[0] in ("head", "norm") or parts[-1] in ("relative_position_index", "attn_mask"):
        return None
    if parts[0] == "layers" and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) + 1)
    return "swin." + ".".join(parts)


def test_convert_microsoft_checkpoint_round_trip():
    microsoft = microsoft_state_dict(**ARCH)
    backbone = SwinBackbone(**ARCH, out_features=ALL_FEATURES)
    converted, missing = convert_swin_checkpoint({"model": microsoft}, backbone)
    out_norm_keys = sorted(k for k in backbone.state_dict() if k.startswith("out_norms."))
    assert missing == out_norm_keys and len(missing) == 8

    result = backbone.load_state_dict(converted, strict=False)
    assert sorted(result.missing_keys) == missing
    assert result.unexpected_keys == []
    loaded = backbone.state_dict()
    targets = {backbone_key(k): v for k, v in microsoft.items() if backbone_key(k)}
    assert set(targets) == set(converted)
    for key, value in targets.items():
        assert torch.equal(loaded[key], value), key


def test_converted_backbone_equals_timm_swin():
    """Where every map is a multiple of the window, timm's own blocks give the same features."""
    microsoft = microsoft_state_dict(**ARCH)
    backbone = SwinBackbone(**ARCH, out_features=ALL_FEATURES).eval()
    backbone.load_state_dict(convert_swin_checkpoint(microsoft, backbone)[0], strict=False)
    timm_swin = SwinTransformer(
        **ARCH, num_classes=5, always_partition=True, strict_img_size=False
    ).eval()
    timm_swin.load_state_dict(checkpoint_filter_fn(microsoft, timm_swin))

    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        ours = backbone(images)
        theirs = timm_swin.forward_intermediates(images, intermediates_only=True)
    for name, feature in zip(ALL_FEATURES, theirs):
        expected = F.layer_norm(feature.permute(0, 2, 3, 1), feature.shape[1:2])
        torch.testing.assert_close(ours[name], expected.permute(0, 3, 1, 2))


def test_convert_detection_layout_with_out_norms():
    microsoft = microsoft_state_dict(**ARCH)
    detection = {k: v for k, v in microsoft.items() if not k.startswith(("head.", "norm."))}
    for i in range(4):
        detection[f"norm{i}.weight"] = torch.full((8 * 2**i,), float(i + 1))
        detection[f"norm{i}.bias"] = torch.full((8 * 2**i,), -float(i + 1))

    backbone = SwinBackbone(**ARCH, out_features=("res3", "res4"))
    converted, missing = convert_swin_checkpoint(detection, backbone)
    assert missing == []
    backbone.load_state_dict(converted, strict=True)
    assert len(backbone.swin.layers) == 3
    assert torch.equal(backbone.out_norms["res3"].weight, torch.full((16,), 2.0))
    assert torch.equal(backbone.out_norms["res4"].bias, torch.full((32,), -3.0))


def test_convert_rejects_unknown_keys():
    microsoft = microsoft_state_dict(**ARCH)
    microsoft["absolute_pos_embed"] = torch.zeros(1, 8, 56, 56)
    with pytest.raises(ValueError, match="absolute_pos_embed"):
        convert_swin_checkpoint(microsoft, SwinBackbone(**ARCH))


AUTHORS_SWIN = os.path.join(
    os.environ.get("DINO_AUTHORS_REPO", "/work/ref/IDEA-Research+DINO"),
    "models",
    "dino",
    "swin_transformer.py",
)


@pytest.mark.skipif(not os.path.exists(AUTHORS_SWIN), reason="the DINO authors' code is not here")
def test_matches_the_authors_swin_on_odd_sizes(monkeypatch):
    """Converted weights of the authors' Swin give the same features for sizes off the window."""
    util = types.ModuleType("util")
    util.misc = types.ModuleType("util.misc")
    util.misc.NestedTensor = object
    monkeypatch.setitem(sys.modules, "util", util)
    monkeypatch.setitem(sys.modules, "util.misc", util.misc)
    spec = importlib.util.spec_from_file_location("authors_swin", AUTHORS_SWIN)
    authors = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        spec.loader.exec_module(authors)

    torch.manual_seed(0)
    arch = dict(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7)
    reference = authors.SwinTransformer(**arch, out_indices=(0, 1, 2, 3), drop_path_rate=0.0)
    reference.eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    backbone = SwinBackbone(**arch, out_features=ALL_FEATURES, drop_path_rate=0.0).eval()
    converted, missing = convert_swin_checkpoint(reference.state_dict(), backbone)
    assert missing == []
    backbone.load_state_dict(converted, strict=True)

    images = torch.randn(2, 3, 70, 101)
    with torch.no_grad():
        expected = reference.forward_raw(images)
        ours = backbone(images)
    for name, feature in zip(ALL_FEATURES, expected):
        torch.testing.assert_close(ours[name], feature, rtol=1e-5, atol=1e-5)
