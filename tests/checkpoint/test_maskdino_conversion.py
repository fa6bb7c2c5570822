"""Converting the authors' Mask DINO checkpoints (IDEA-Research/MaskDINO): every tensor of a
synthetic authors'-layout state dict lands in the Mask DINO project's keys with its shape,
nothing is left over, and what dino_d2 cannot express is refused with the reason."""

import importlib.util

import pytest
import torch
from checkpoint_layouts import SMALL, build_model

from dino_d2.checkpoint import ConversionError
from dino_d2.checkpoint.convert import DETECTOR_LAYOUTS, SOURCES, detect_source
from dino_d2.checkpoint.mapping import map_state_dict

P, Q = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
EMBED = 32  # SMALL's transformer width
MASK_DIM = 24
HEADS, LEVELS = 8, 4  # the attention heads and levels of SMALL (and of the released models)


def _mask_head_state(generator):
    """The Mask DINO project's head keys (dino_d2.projects.mask_dino: MaskHead with a
    MaskPixelDecoder fusing res2, 256 channels in ResNet-50) with random values."""
    shapes = {
        "heads.masks.pixel_decoder.lateral.weight": (EMBED, 256, 1, 1),
        "heads.masks.pixel_decoder.lateral.norm.weight": (EMBED,),
        "heads.masks.pixel_decoder.lateral.norm.bias": (EMBED,),
        "heads.masks.pixel_decoder.output.weight": (EMBED, EMBED, 3, 3),
        "heads.masks.pixel_decoder.output.norm.weight": (EMBED,),
        "heads.masks.pixel_decoder.output.norm.bias": (EMBED,),
        "heads.masks.pixel_decoder.mask_features.weight": (MASK_DIM, EMBED, 1, 1),
        "heads.masks.pixel_decoder.mask_features.bias": (MASK_DIM,),
        "heads.masks.mask_embed.layers.0.weight": (EMBED, EMBED),
        "heads.masks.mask_embed.layers.0.bias": (EMBED,),
        "heads.masks.mask_embed.layers.1.weight": (EMBED, EMBED),
        "heads.masks.mask_embed.layers.1.bias": (EMBED,),
        "heads.masks.mask_embed.layers.2.weight": (MASK_DIM, EMBED),
        "heads.masks.mask_embed.layers.2.bias": (MASK_DIM,),
    }
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def target():
    """A dino_d2 Mask DINO state dict: DINO's keys (shared heads, as Mask DINO shares them) and
    the mask head's; the decoder norm is one tensor with the mask head's norm and the proposals'
    heads with the decoder's (as each is one module in the authors' model)."""
    state = dict(build_model(SMALL + ["model.transformer.decoder.share_heads=True"]).state_dict())
    state.update(_mask_head_state(torch.Generator().manual_seed(3)))
    return _tied_as_the_authors(state)


def _tied_as_the_authors(state):
    """``state`` with the tensors that are one module in the authors' model made equal."""
    state = dict(state)
    for p in ("weight", "bias"):
        state[f"heads.masks.norm.{p}"] = state[f"transformer.decoder.norm.{p}"]
        # The authors' proposals use the decoder's one class head and one box head.
        state[f"transformer.query_selection.class_embed.{p}"] = state[
            f"transformer.decoder.class_embed.0.{p}"
        ]
        for k in range(3):
            state[f"transformer.query_selection.bbox_embed.layers.{k}.{p}"] = state[
                f"transformer.decoder.bbox_embed.0.layers.{k}.{p}"
            ]
    return state


def authors_maskdino_state_dict(state):
    """The authors' names for a dino_d2 Mask DINO state dict, after their model code
    (maskdino/modeling/pixel_decoder/maskdino_encoder.py, transformer_decoder/
    maskdino_decoder.py and dino_decoder.py): shared modules saved under every name they are
    registered with, the criterion's buffer beside them."""
    levels = len({k.split(".")[2] for k in state if k.startswith("backbone.convs.")})
    encoder = {"self_attn_norm.": "norm1.", "ffn.norm.": "norm2.", "ffn.linear": "linear"}
    decoder = {
        "self_attn_norm.": "norm2.",
        "cross_attn_norm.": "norm1.",
        "ffn.norm.": "norm3.",
        "ffn.linear": "linear",
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.bottom_up."):
            out["backbone." + key[len("backbone.bottom_up.") :]] = value
        elif key.startswith("backbone.convs."):
            out[P + "input_proj." + ".".join(parts[2:])] = value
        elif key.startswith("backbone.extra_convs."):
            out[P + f"input_proj.{levels + int(parts[2])}." + ".".join(parts[3:])] = value
        elif key == "transformer.level_embed":
            out[P + key] = value
        elif key.startswith(("transformer.encoder.layers.", "transformer.decoder.layers.")):
            table = encoder if parts[1] == "encoder" else decoder
            rest = ".".join(parts[4:])
            for ours, theirs in table.items():
                rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
            prefix = P + "transformer.encoder" if parts[1] == "encoder" else Q + "decoder"
            if rest.startswith(("cross_attn.sampling_offsets.", "cross_attn.attention_weights.")):
                # MaskDINODecoder.forward flattens the levels coarse first: (heads, levels, ...)
                # rows with the level axis reversed.
                value = value.reshape(HEADS, LEVELS, -1, *value.shape[1:]).flip(1)
                value = value.reshape(state[key].shape)
            out[f"{prefix}.layers.{parts[3]}.{rest}"] = value
        elif key.startswith("transformer.decoder.norm."):
            out[Q + "decoder_norm." + parts[-1]] = value
            out[Q + "decoder.norm." + parts[-1]] = value
        elif key.startswith("transformer.decoder.ref_point_head."):
            out[Q + "decoder." + ".".join(parts[2:])] = value
        elif key.startswith("transformer.decoder.class_embed."):
            out[Q + "class_embed." + parts[-1]] = value
        elif key.startswith("transformer.decoder.bbox_embed."):
            rest = ".".join(parts[4:])
            out[Q + "_bbox_embed." + rest] = value
            out[Q + f"bbox_embed.{parts[3]}.{rest}"] = value
            out[Q + f"decoder.bbox_embed.{parts[3]}.{rest}"] = value
        elif key.startswith("transformer.query_selection."):
            rest = ".".join(parts[2:])
            if rest == "tgt_embed.weight":
                out[Q + "query_feat.weight"] = value
            elif rest.startswith(("enc_output.", "enc_output_norm.")):
                out[Q + rest] = value
        elif key == "denoising.label_enc.weight":
            out[Q + "label_enc.weight"] = value
        elif key.startswith("heads.masks.pixel_decoder."):
            rest = ".".join(parts[3:])
            for ours, theirs in (("lateral.", "adapter_1."), ("output.", "layer_1.")):
                rest = theirs + rest[len(ours) :] if rest.startswith(ours) else rest
            out[P + rest] = value
        elif key.startswith("heads.masks.mask_embed."):
            out[Q + ".".join(parts[2:])] = value
        elif not key.startswith("heads.masks.norm."):
            raise AssertionError(f"the test's builder does not know {key}")
    out["criterion.empty_weight"] = torch.ones(3)
    return out


def _map(authors):
    layout = DETECTOR_LAYOUTS["maskdino"]
    arch = layout.inspect(authors, None, None)
    return layout, arch


def test_every_tensor_lands_and_nothing_is_left_over(target):
    authors = authors_maskdino_state_dict(target)
    assert detect_source({"model": authors, "iteration": 1}) == "maskdino" and "maskdino" in SOURCES
    layout, arch = _map(authors)
    shapes = {k: v.shape for k, v in target.items()}
    converted, consumed = map_state_dict(shapes, authors, layout.rules(arch), "maskdino")
    assert converted.keys() == target.keys()
    for key, value in target.items():
        assert torch.equal(converted[key], value), key
    leftovers = [k for k in authors if k not in consumed and not layout.is_ignored(k)]
    assert leftovers == []
    # The decoder's cross-attention levels come back fine first: not the authors' row order.
    key = "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight"
    assert not torch.equal(
        authors[Q + "decoder.layers.1.cross_attn.sampling_offsets.weight"], target[key]
    )
    # The shared heads: one source tensor for every layer and for the encoder proposals.
    assert torch.equal(
        converted["transformer.query_selection.class_embed.weight"],
        converted["transformer.decoder.class_embed.2.weight"],
    )


def test_architecture_and_config_values(target):
    _, arch = _map(authors_maskdino_state_dict(target))
    values = arch.config_values((8, 8))
    assert arch.family == "maskdino" and arch.default_config() == "maskdino_r50_4scale_50ep.py"
    assert values["model.backbone.bottom_up.out_features"] == ["res2", "res3", "res4", "res5"]
    assert values["model.backbone.in_features"] == ["res3", "res4", "res5"]
    assert values["model.backbone.bottom_up.freeze_at"] == 0
    assert values["model.heads.masks.pixel_decoder.feature"] == "res2"
    assert values["model.heads.masks.pixel_decoder.in_channels"] == 256
    assert values["model.heads.masks.pixel_decoder.mask_dim"] == MASK_DIM
    assert values["model.transformer.num_levels"] == 4
    assert values["model.transformer.embed_dim"] == EMBED
    assert values["model.transformer.decoder.share_heads"] is True
    assert values["model.transformer.position_embedding.temperature"] == 10000
    assert values["model.num_classes"] == target["denoising.label_enc.weight"].shape[0]
    assert values["model.content_from_proposals"] is False
    assert values["model.class_on_normed_states"] is True


def test_content_queries_from_the_proposals(target):
    """The released LEARN_TGT False: no query_feat, content from the proposals, the unused
    tgt_embed zeros, 300 queries."""
    state = dict(target)
    authors = authors_maskdino_state_dict(state)
    del authors[Q + "query_feat.weight"]
    layout, arch = _map(authors)
    values = arch.config_values((8, 8))
    assert values["model.content_from_proposals"] is True
    assert values["model.transformer.query_selection.num_queries"] == 300
    shapes = {k: v.shape for k, v in target.items()}
    shapes["transformer.query_selection.tgt_embed.weight"] = torch.Size([300, EMBED])
    converted, consumed = map_state_dict(shapes, authors, layout.rules(arch), "maskdino")
    assert not converted["transformer.query_selection.tgt_embed.weight"].any()
    assert [k for k in authors if k not in consumed and not layout.is_ignored(k)] == []


def test_coarse_level_first_is_refused(target):
    authors = authors_maskdino_state_dict(target)
    for part in ("0.weight", "0.bias", "1.weight", "1.bias"):
        first, last = P + f"input_proj.0.{part}", P + f"input_proj.2.{part}"
        authors[first], authors[last] = authors[last], authors[first]
    with pytest.raises(ConversionError, match="high2low"):
        _map(authors)


@pytest.mark.skipif(
    importlib.util.find_spec("dino_d2.projects") is None,
    reason="the Mask DINO project (dino_d2.projects.mask_dino) is not in this tree",
)
def test_converts_into_the_mask_dino_project_model(tmp_path):
    """End to end through convert_checkpoint and save_checkpoint, on the project's config."""
    from detectron2.config import LazyConfig, instantiate

    from dino_d2.checkpoint import convert_checkpoint, load_config, save_checkpoint

    cfg = load_config("maskdino_r50_4scale_50ep.py")
    LazyConfig.apply_overrides(cfg, SMALL)
    torch.manual_seed(0)
    state = _tied_as_the_authors(instantiate(cfg.model).state_dict())
    authors = authors_maskdino_state_dict(state)
    result = convert_checkpoint("maskdino", {"model": authors})
    assert result.config == "maskdino_r50_4scale_50ep.py"
    assert "model.content_from_proposals=False" in result.overrides
    for key, value in state.items():
        assert torch.equal(result.state_dict[key], value), key
    save_checkpoint(result, str(tmp_path / "converted.pth"))
    # As released (LEARN_TGT False): the project's default content from the proposals.
    del authors[Q + "query_feat.weight"]
    result = convert_checkpoint("maskdino", {"model": authors})
    assert not any(o.startswith("model.content_from_proposals") for o in result.overrides)
    save_checkpoint(result, str(tmp_path / "released.pth"))
