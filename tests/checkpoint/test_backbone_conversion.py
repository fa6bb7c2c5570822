"""Backbone weights: torchvision / FrozenBN / mmcv-style ResNets and Microsoft's Swin release."""

import pytest
import torch
import torchvision
from checkpoint_layouts import SMALL, authors_state_dict, build_model
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone import BasicStem, ResNet

from dino_d2.checkpoint import ConversionError, convert_checkpoint, save_checkpoint
from dino_d2.modeling.backbone import SWIN_PRESETS

FEATURES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(scope="module")
def torchvision_r50():
    """A torchvision ResNet-50 in eval mode with random batch-norm statistics and affines."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(1234)
    return model


@torch.no_grad()
def torchvision_features(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    out = {}
    for name, layer in zip(FEATURES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = out[name] = layer(x)
    return out


@torch.no_grad()
def assert_same_features(converted, reference_model, prefix="backbone.bottom_up."):
    """Detectron2's FrozenBN ResNet with the converted weights equals the BN-eval reference."""
    backbone = ResNet(
        stem=BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=ResNet.make_default_stages(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=FEATURES,
    ).eval()
    weights = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
    backbone.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    ours, expected = backbone(images), torchvision_features(reference_model, images)
    for name in FEATURES:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4)


def test_torchvision_resnet50_features_and_strict_load(torchvision_r50, tmp_path):
    state = torchvision_r50.state_dict()
    result = convert_checkpoint("torchvision-resnet", state)
    assert result.config == "dino_r50_4scale_12ep.py" and result.overrides == []
    assert all(k.startswith("backbone.bottom_up.") for k in result.state_dict)
    assert torch.equal(
        result.state_dict["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
        state["layer2.0.downsample.1.running_var"],
    )
    assert_same_features(result.state_dict, torchvision_r50)

    model = result.build_model()
    path = str(tmp_path / "R-50.pkl")
    save_checkpoint(result, path, model=model)
    fresh = result.build_model()
    DetectionCheckpointer(fresh).load(path)
    loaded = fresh.state_dict()
    for key, value in result.state_dict.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("source", ["idea", "easycv"])
def test_detector_resnet_numerics(torchvision_r50, source):
    """The authors' FrozenBN ResNet (backbone.0.body, no counters) and EasyCV's mmcv BN ResNet
    (backbone., num_batches_tracked): the converted backbone computes the BN-eval features."""
    head = authors_state_dict(
        build_model(SMALL).state_dict(),
        head="" if source == "idea" else "head.",
        coco=source == "idea",
    )
    prefix = "backbone.0.body." if source == "idea" else "backbone."
    checkpoint = {k: v for k, v in head.items() if not k.startswith("backbone.")}
    for key, value in torchvision_r50.state_dict().items():
        # The authors' IntermediateLayerGetter drops the classifier, and so does EasyCV's
        # detection ResNet; only EasyCV's BatchNorm2d has counters.
        if key.startswith("fc.") or source == "idea" and key.endswith("num_batches_tracked"):
            continue
        checkpoint[prefix + key] = value
    container = "model" if source == "idea" else "state_dict"
    result = convert_checkpoint(source, {container: checkpoint})
    assert sorted(result.overrides) == sorted(SMALL)
    assert_same_features(result.state_dict, torchvision_r50)


def test_resnet101_depth_gives_the_r101_config():
    with torch.device("meta"):
        state = torchvision.models.resnet101(weights=None).state_dict()
    result = convert_checkpoint("torchvision-resnet", state)
    assert result.config == "dino_r101_4scale_12ep.py" and result.overrides == []
    result = convert_checkpoint("torchvision-resnet", state, config="dino_r50_4scale_12ep.py")
    assert result.overrides == ["model.backbone.bottom_up.stages.depth=101"]
    assert "backbone.bottom_up.res4.22.conv3.norm.weight" in result.state_dict


def test_basic_block_resnet_is_refused():
    with torch.device("meta"):
        state = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ConversionError, match=r"\[2, 2, 2, 2\] basic blocks"):
        convert_checkpoint("torchvision-resnet", state)


def microsoft_swin(embed_dim, depths, num_heads, window_size, seed=0):
    """Microsoft's Swin release layout (``{'model': ...}``), random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    state = {
        "patch_embed.proj.weight": rand(embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": rand(embed_dim),
    }
    state.update(
        {"patch_embed.norm.weight": rand(embed_dim), "patch_embed.norm.bias": rand(embed_dim)}
    )
    area = window_size**2
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2**stage
        for block in range(depth):
            p = f"layers.{stage}.blocks.{block}."
            for name, shape in (
                ("norm1", (dim,)),
                ("norm2", (dim,)),
                ("attn.qkv", (3 * dim, dim)),
                ("attn.proj", (dim, dim)),
                ("mlp.fc1", (4 * dim, dim)),
                ("mlp.fc2", (dim, 4 * dim)),
            ):
                state[p + name + ".weight"] = rand(*shape)
                state[p + name + ".bias"] = rand(shape[0])
            state[p + "attn.relative_position_bias_table"] = rand((2 * window_size - 1) ** 2, heads)
            state[p + "attn.relative_position_index"] = torch.zeros(area, area, dtype=torch.long)
        if stage < len(depths) - 1:
            state[f"layers.{stage}.downsample.reduction.weight"] = rand(2 * dim, 4 * dim)
            state[f"layers.{stage}.downsample.norm.weight"] = rand(4 * dim)
            state[f"layers.{stage}.downsample.norm.bias"] = rand(4 * dim)
    last = embed_dim * 2 ** (len(depths) - 1)
    state.update({"norm.weight": rand(last), "norm.bias": rand(last)})
    state.update({"head.weight": rand(10, last), "head.bias": rand(10)})
    return {"model": state}


def test_swin_release_small_architecture(tmp_path):
    arch = dict(embed_dim=8, depths=[2, 2, 4, 2], num_heads=[1, 2, 4, 8], window_size=7)
    checkpoint = microsoft_swin(**arch)
    result = convert_checkpoint("swin", checkpoint)
    assert result.config == "dino_swin_tiny_224_4scale_12ep.py"
    assert sorted(result.overrides) == sorted(
        [
            "model.backbone.bottom_up.embed_dim=8",
            "model.backbone.bottom_up.depths=[2,2,4,2]",
            "model.backbone.bottom_up.num_heads=[1,2,4,8]",
        ]
    )
    # The ImageNet release has no per-level norms: they keep the model's initialization.
    assert sorted(result.initialized) == sorted(
        f"backbone.bottom_up.out_norms.res{i}.{p}" for i in (3, 4, 5) for p in ("weight", "bias")
    )
    assert torch.equal(
        result.state_dict["backbone.bottom_up.out_norms.res4.weight"], torch.ones(32)
    )
    source = checkpoint["model"]
    assert torch.equal(
        result.state_dict["backbone.bottom_up.swin.layers.2.blocks.3.mlp.fc2.bias"],
        source["layers.2.blocks.3.mlp.fc2.bias"],
    )
    # Microsoft keeps the patch merging at the end of a stage, timm at the start of the next.
    assert torch.equal(
        result.state_dict["backbone.bottom_up.swin.layers.1.downsample.reduction.weight"],
        source["layers.0.downsample.reduction.weight"],
    )
    save_checkpoint(result, str(tmp_path / "swin.pth"))


def test_swin_release_presets_pick_their_config():
    large = {k: v for k, v in SWIN_PRESETS["large_384"].items() if k != "pretrain_img_size"}
    with torch.device("meta"):
        checkpoint = microsoft_swin(**large)
    result = convert_checkpoint("swin", checkpoint)
    assert result.config == "dino_swin_large_384_4scale_12ep.py" and result.overrides == []
