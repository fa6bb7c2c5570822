"""Converting trained DINO detectors: the authors' (idea), detrex and EasyCV layouts."""

import argparse

import pytest
import torch
from checkpoint_layouts import SMALL, authors_state_dict, build_model, detrex_state_dict
from detectron2.checkpoint import DetectionCheckpointer

from dino_d2.checkpoint import ConversionError, convert_checkpoint, save_checkpoint

FIVE_SCALE = [
    "model.backbone.bottom_up.out_features=[res2,res3,res4,res5]",
    "model.transformer.num_levels=5",
]
DETREX = [
    "model.transformer.position_embedding.temperature=10000",
    "model.transformer.position_embedding.offset=-0.5",
    "model.transformer.decoder.share_heads=False",
    "model.backbone.bottom_up.freeze_at=1",
]

# Real names and shapes of the released R50 4-scale checkpoints, from the reference code.
REAL_IDEA = {
    "backbone.0.body.conv1.weight": (64, 3, 7, 7),
    "backbone.0.body.bn1.running_var": (64,),
    "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.0.body.layer1.0.downsample.1.bias": (256,),
    "backbone.0.body.layer2.0.conv2.weight": (128, 128, 3, 3),
    "backbone.0.body.layer3.5.bn3.running_mean": (1024,),
    "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "input_proj.0.0.weight": (256, 512, 1, 1),
    "input_proj.0.0.bias": (256,),
    "input_proj.1.1.weight": (256,),
    "input_proj.2.0.weight": (256, 2048, 1, 1),
    "input_proj.3.0.weight": (256, 2048, 3, 3),
    "input_proj.3.1.bias": (256,),
    "transformer.level_embed": (4, 256),
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight": (256, 256),
    "transformer.encoder.layers.0.self_attn.attention_weights.weight": (128, 256),
    "transformer.encoder.layers.0.self_attn.value_proj.bias": (256,),
    "transformer.encoder.layers.5.self_attn.output_proj.weight": (256, 256),
    "transformer.encoder.layers.5.norm1.weight": (256,),
    "transformer.encoder.layers.5.linear1.weight": (2048, 256),
    "transformer.encoder.layers.5.linear2.weight": (256, 2048),
    "transformer.encoder.layers.5.norm2.bias": (256,),
    "transformer.decoder.layers.0.self_attn.in_proj_weight": (768, 256),
    "transformer.decoder.layers.0.self_attn.in_proj_bias": (768,),
    "transformer.decoder.layers.0.self_attn.out_proj.weight": (256, 256),
    "transformer.decoder.layers.3.cross_attn.sampling_offsets.bias": (256,),
    "transformer.decoder.layers.3.cross_attn.attention_weights.bias": (128,),
    "transformer.decoder.layers.5.norm1.weight": (256,),
    "transformer.decoder.layers.5.norm2.weight": (256,),
    "transformer.decoder.layers.5.norm3.bias": (256,),
    "transformer.decoder.layers.5.linear1.bias": (2048,),
    "transformer.decoder.norm.weight": (256,),
    "transformer.decoder.ref_point_head.layers.0.weight": (256, 512),
    "transformer.decoder.ref_point_head.layers.1.weight": (256, 256),
    "transformer.tgt_embed.weight": (900, 256),
    "transformer.enc_output.weight": (256, 256),
    "transformer.enc_output_norm.bias": (256,),
    "transformer.enc_out_class_embed.weight": (91, 256),
    "transformer.enc_out_bbox_embed.layers.2.weight": (4, 256),
    "class_embed.0.weight": (91, 256),
    "class_embed.5.bias": (91,),
    "bbox_embed.0.layers.0.weight": (256, 256),
    "bbox_embed.5.layers.2.bias": (4,),
    "transformer.decoder.class_embed.3.weight": (91, 256),
    "transformer.decoder.bbox_embed.3.layers.1.weight": (256, 256),
    "label_enc.weight": (92, 256),
}
REAL_DETREX = {
    "backbone.stem.conv1.weight": (64, 3, 7, 7),
    "backbone.stem.conv1.norm.bias": (64,),
    "backbone.res2.0.shortcut.weight": (256, 64, 1, 1),
    "backbone.res2.0.shortcut.norm.running_mean": (256,),
    "backbone.res3.0.conv1.weight": (128, 256, 1, 1),
    "backbone.res4.5.conv3.norm.weight": (1024,),
    "backbone.res5.2.conv2.weight": (512, 512, 3, 3),
    "neck.convs.0.conv.weight": (256, 512, 1, 1),
    "neck.convs.0.conv.bias": (256,),
    "neck.convs.2.norm.weight": (256,),
    "neck.extra_convs.0.conv.weight": (256, 2048, 3, 3),
    "neck.extra_convs.0.norm.bias": (256,),
    "transformer.level_embeds": (4, 256),
    "transformer.tgt_embed.weight": (900, 256),
    "transformer.enc_output.weight": (256, 256),
    "transformer.enc_output_norm.bias": (256,),
    "transformer.encoder.layers.0.attentions.0.sampling_offsets.weight": (256, 256),
    "transformer.encoder.layers.0.attentions.0.attention_weights.weight": (128, 256),
    "transformer.encoder.layers.2.attentions.0.value_proj.weight": (256, 256),
    "transformer.encoder.layers.5.ffns.0.layers.0.0.weight": (2048, 256),
    "transformer.encoder.layers.5.ffns.0.layers.1.weight": (256, 2048),
    "transformer.encoder.layers.5.norms.0.weight": (256,),
    "transformer.encoder.layers.5.norms.1.bias": (256,),
    "transformer.decoder.layers.0.attentions.0.attn.in_proj_weight": (768, 256),
    "transformer.decoder.layers.0.attentions.0.attn.out_proj.bias": (256,),
    "transformer.decoder.layers.4.attentions.1.sampling_offsets.bias": (256,),
    "transformer.decoder.layers.4.attentions.1.output_proj.weight": (256, 256),
    "transformer.decoder.layers.5.norms.2.weight": (256,),
    "transformer.decoder.layers.5.ffns.0.layers.0.0.bias": (2048,),
    "transformer.decoder.ref_point_head.layers.0.weight": (256, 512),
    "transformer.decoder.norm.weight": (256,),
    "class_embed.0.weight": (80, 256),
    "class_embed.6.bias": (80,),
    "bbox_embed.6.layers.2.weight": (4, 256),
    "transformer.decoder.class_embed.6.weight": (80, 256),
    "transformer.decoder.bbox_embed.0.layers.0.weight": (256, 256),
    "label_enc.weight": (80, 256),
}
REAL_EASYCV = {
    "backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.bn1.num_batches_tracked": (),
    "backbone.layer1.0.downsample.1.running_mean": (256,),
    "backbone.layer4.0.bn2.weight": (512,),
    "head.input_proj.0.0.weight": (256, 512, 1, 1),
    "head.input_proj.3.0.weight": (256, 2048, 3, 3),
    "head.transformer.level_embed": (4, 256),
    "head.transformer.encoder.layers.0.norm1.weight": (256,),
    "head.transformer.decoder.layers.0.self_attn.in_proj_weight": (768, 256),
    "head.transformer.tgt_embed.weight": (900, 256),
    "head.transformer.enc_out_class_embed.weight": (80, 256),
    "head.class_embed.0.weight": (80, 256),
    "head.bbox_embed.0.layers.0.weight": (256, 256),
    "head.label_enc.weight": (81, 256),
}


def same_state(result_state, expected):
    assert set(result_state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(result_state[key], value), key


@pytest.fixture(scope="module")
def small_idea():
    model = build_model(SMALL)
    state = model.state_dict()
    source = authors_state_dict(state)
    checkpoint = {"model": source, "optimizer": {}, "lr_scheduler": {}, "epoch": 11}
    return state, source, convert_checkpoint("idea", checkpoint)


def test_idea_every_tensor_lands(small_idea):
    state, _, result = small_idea
    assert result.config == "dino_r50_4scale_12ep.py"
    assert sorted(result.overrides) == sorted(SMALL)
    same_state(result.state_dict, state)


def test_idea_coco_rows_remapped(small_idea):
    _, source, result = small_idea
    converted = result.state_dict
    for ours, theirs in (
        ("transformer.decoder.class_embed.2.weight", "class_embed.2.weight"),
        ("transformer.decoder.class_embed.0.bias", "class_embed.0.bias"),
        (
            "transformer.query_selection.class_embed.weight",
            "transformer.enc_out_class_embed.weight",
        ),
        ("denoising.label_enc.weight", "label_enc.weight"),
    ):
        assert converted[ours].shape[0] == 80
        # COCO id 1 (person) -> class 0, id 90 (toothbrush) -> 79, id 13 (stop sign) -> 11.
        for category_id, contiguous in ((1, 0), (90, 79), (13, 11)):
            assert torch.equal(converted[ours][contiguous], source[theirs][category_id])
    # The rows the authors never train (id 0, the gaps, the label embedding's spare row) are gone.
    label_rows = converted["denoising.label_enc.weight"]
    for unused in (0, 12, 26, 83, 91):
        assert not (label_rows == source["label_enc.weight"][unused]).all(1).any()


def test_idea_shared_heads_load_strictly_and_round_trip(small_idea, tmp_path):
    state, _, result = small_idea
    model = result.build_model()
    decoder = model.transformer.decoder
    assert all(head is decoder.class_embed[0] for head in decoder.class_embed)
    path = str(tmp_path / "idea.pth")
    save_checkpoint(result, path, model=model)
    fresh = result.build_model()
    DetectionCheckpointer(fresh).load(path)
    same_state(fresh.state_dict(), state)
    assert torch.load(path, weights_only=True)["matching_heuristics"] is False


def test_idea_independent_heads_and_five_scales():
    model = build_model(SMALL + FIVE_SCALE + ["model.transformer.decoder.share_heads=False"])
    state = model.state_dict()
    result = convert_checkpoint("idea", {"model": authors_state_dict(state)})
    assert result.config == "dino_r50_5scale_12ep.py"
    assert sorted(result.overrides) == sorted(
        SMALL + ["model.transformer.decoder.share_heads=False"]
    )
    same_state(result.state_dict, state)
    assert "input_proj.4.0.weight" in authors_state_dict(state)


def test_idea_args_set_what_the_weights_cannot_tell():
    model = build_model(SMALL)
    source = authors_state_dict(model.state_dict())
    args = argparse.Namespace(
        nheads=8,
        enc_n_points=4,
        dec_n_points=4,
        pe_temperatureH=20,
        pe_temperatureW=20,
        num_select=100,
        use_dn=True,
        dn_number=100,
        dn_box_noise_scale=0.4,
        dn_label_noise_ratio=0.5,
        two_stage_type="standard",
        decoder_module_seq=["sa", "ca", "ffn"],
    )
    result = convert_checkpoint("idea", {"model": source, "args": args})
    assert sorted(result.overrides) == sorted(
        SMALL + ["model.num_select=100", "model.denoising.box_noise_scale=0.4"]
    )
    args.nheads = 4
    with pytest.raises(ConversionError, match="4 heads x 4 levels x 4 points"):
        convert_checkpoint("idea", {"model": source, "args": args})
    args.nheads, args.decoder_sa_type = 8, "ca_label"
    with pytest.raises(ConversionError, match="decoder_sa_type='ca_label'"):
        convert_checkpoint("idea", {"model": source, "args": args})


def test_idea_num_classes_keeps_leading_rows():
    model = build_model(SMALL + ["model.num_classes=91"])
    state = model.state_dict()
    source = authors_state_dict(state, coco=False)
    source["label_enc.weight"] = source["label_enc.weight"][:92]
    result = convert_checkpoint("idea", {"model": source}, num_classes=91)
    assert sorted(result.overrides) == sorted(SMALL + ["model.num_classes=91"])
    same_state(result.state_dict, state)


def test_detrex_round_trip():
    model = build_model(SMALL + ["model.transformer.decoder.share_heads=False"])
    state = model.state_dict()
    source = detrex_state_dict(state)
    assert "class_embed.3.weight" in source and "bbox_embed.3.layers.2.bias" in source
    result = convert_checkpoint("detrex", {"model": source, "optimizer": {}, "iteration": 5})
    assert result.config == "dino_r50_4scale_12ep.py"
    assert sorted(result.overrides) == sorted(SMALL + DETREX)
    same_state(result.state_dict, state)
    result.build_model().load_state_dict(result.state_dict, strict=True)


def test_easycv_round_trip():
    model = build_model(SMALL)
    state = model.state_dict()
    source = authors_state_dict(
        state, head="head.", backbone="backbone.", coco=False, counters=True
    )
    assert source["head.label_enc.weight"].shape[0] == 81
    result = convert_checkpoint("easycv", {"meta": {}, "state_dict": source, "optimizer": {}})
    assert sorted(result.overrides) == sorted(SMALL)
    same_state(result.state_dict, state)


@pytest.mark.parametrize(
    "source, real, builder, extra",
    [
        ("idea", REAL_IDEA, authors_state_dict, []),
        ("detrex", REAL_DETREX, detrex_state_dict, ["model.transformer.decoder.share_heads=False"]),
        (
            "easycv",
            REAL_EASYCV,
            lambda s: authors_state_dict(
                s, head="head.", backbone="backbone.", coco=False, counters=True
            ),
            [],
        ),
    ],
)
def test_released_layouts_need_no_size_overrides(source, real, builder, extra):
    """Full-size R50 4-scale checkpoints: the real key names exist, the shipped config fits."""
    state = build_model(extra).state_dict()
    checkpoint = builder(state)
    for key, shape in real.items():
        assert tuple(checkpoint[key].shape) == shape, key
    container = "state_dict" if source == "easycv" else "model"
    result = convert_checkpoint(source, {container: checkpoint})
    assert result.config == "dino_r50_4scale_12ep.py"
    assert sorted(result.overrides) == sorted(DETREX if source == "detrex" else [])
    assert len(result.state_dict) == len(state)


SWIN_SMALL = [
    "model.backbone.bottom_up.embed_dim=8",
    "model.backbone.bottom_up.depths=[2,2,2,2]",
    "model.backbone.bottom_up.num_heads=[1,2,4,8]",
]


@pytest.mark.parametrize("source", ["idea", "easycv"])
def test_swin_detector_five_scales(source):
    overrides = SWIN_SMALL + SMALL + FIVE_SCALE
    state = build_model(overrides, config="dino_swin_tiny_224_4scale_12ep.py").state_dict()
    if source == "idea":
        checkpoint, prefix = {"model": authors_state_dict(state)}, "backbone.0."
    else:
        head = authors_state_dict(state, head="head.", backbone="backbone.", coco=False)
        checkpoint, prefix = {"state_dict": head}, "backbone."
    weights = next(iter(checkpoint.values()))
    assert (
        prefix + "norm0.weight" in weights and prefix + "layers.0.downsample.norm.bias" in weights
    )
    # The Swin detection code saves its relative position indices; they are recomputed instead.
    weights[prefix + "layers.1.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49).long()
    result = convert_checkpoint(source, checkpoint)
    assert result.config == "dino_swin_tiny_224_4scale_12ep.py"
    assert sorted(result.overrides) == sorted(overrides)
    same_state(result.state_dict, state)
