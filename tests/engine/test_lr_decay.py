"""Layer-wise learning-rate decay of ViT backbones."""

import pytest
import torch

from dino_d2._compat import detectron2_has_vitdet
from dino_d2.engine import ViTLayerDecay, get_optimizer_params
from dino_d2.modeling.backbone import SimplePyramid, TimmBackbone


@pytest.mark.parametrize(
    "name, layer_id",
    [
        ("backbone.bottom_up.net.patch_embed.proj.weight", 0),
        ("backbone.bottom_up.net.pos_embed", 0),
        ("backbone.bottom_up.net.body.model.cls_token", 0),
        ("backbone.bottom_up.net.body.model.reg_token", 0),
        ("backbone.bottom_up.net.blocks.0.norm1.weight", 1),
        ("backbone.bottom_up.net.blocks.3.attn.rel_pos_h", 4),
        ("backbone.bottom_up.net.body.model.blocks.11.mlp.fc2.bias", 12),
        # Detectron2's convolutional residual blocks inside ViT blocks keep the full rate.
        ("backbone.bottom_up.net.blocks.2.residual.conv1.weight", 13),
        ("backbone.bottom_up.levels.p3.1.norm.weight", 13),
        ("backbone.bottom_up.simfp_3.0.weight", 13),
        ("backbone.convs.0.0.weight", 13),
        ("transformer.encoder.layers.0.blocks.1.weight", 13),
        ("transformer.pos_embed", 13),
    ],
)
def test_layer_ids(name, layer_id):
    decay = ViTLayerDecay(num_layers=12, decay_rate=0.7)
    assert decay.layer_id(name) == layer_id
    assert decay(name) == pytest.approx(0.7 ** (13 - layer_id))


def test_prefix_selects_the_backbone():
    decay = ViTLayerDecay(num_layers=2, decay_rate=0.5, prefix="encoder.")
    assert decay("encoder.blocks.0.attn.qkv.weight") == 0.25
    assert decay("backbone.blocks.0.attn.qkv.weight") == 1.0


def test_a_block_beyond_num_layers_is_an_error():
    with pytest.raises(ValueError, match="block 12, but num_layers is 12"):
        ViTLayerDecay(num_layers=12, decay_rate=0.7)("backbone.net.blocks.12.norm1.weight")


@pytest.mark.parametrize(
    "kwargs", [dict(num_layers=0, decay_rate=0.7), dict(num_layers=12, decay_rate=0.0)]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="ViTLayerDecay"):
        ViTLayerDecay(**kwargs)


def test_parameter_groups_of_a_timm_vit():
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.bottom_up = SimplePyramid(
        net=TimmBackbone(
            model_name="vit_tiny_patch16_224",
            out_indices=(-1,),
            depth=3,
            embed_dim=32,
            num_heads=2,
            dynamic_img_size=True,
        ),
        in_feature="res4",
        out_channels=16,
    )
    model.head = torch.nn.Linear(4, 4)
    decay = ViTLayerDecay(num_layers=3, decay_rate=0.5)
    groups = get_optimizer_params(
        model, base_lr=1.0, weight_decay=0.0, backbone_lr_factor=1.0, lr_factor_func=decay
    )
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    vit = "backbone.bottom_up.net.body.model."
    assert lrs[vit + "cls_token"] == lrs[vit + "pos_embed"] == 0.5**4
    assert lrs[vit + "patch_embed.proj.weight"] == 0.5**4
    assert [lrs[vit + f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [0.5**3, 0.5**2, 0.5]
    assert lrs["backbone.bottom_up.levels.p3.0.weight"] == lrs["head.weight"] == 1.0
    # Every ViT parameter is in one of the five learning rates.
    assert {lr for n, lr in lrs.items() if n.startswith(vit)} == {0.5**k for k in range(1, 5)}


@pytest.mark.skipif(not detectron2_has_vitdet(), reason="Detectron2 main's ViT is not installed")
def test_same_factors_as_detectron2_for_its_vit():
    from detectron2.modeling.backbone.vit import ViT, get_vit_lr_decay_rate

    vit = ViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        window_size=2,
        window_block_indexes=[0, 2],
        residual_block_indexes=[1],
        use_rel_pos=True,
    )
    decay = ViTLayerDecay(num_layers=4, decay_rate=0.7)
    for name, _ in vit.named_parameters():
        for full_name in (f"backbone.net.{name}", f"backbone.bottom_up.net.{name}"):
            expected = get_vit_lr_decay_rate(full_name, lr_decay_rate=0.7, num_layers=4)
            assert decay(full_name) == pytest.approx(expected), full_name
