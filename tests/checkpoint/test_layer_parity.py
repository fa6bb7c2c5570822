"""Converted weights compute what the source modules compute.

The source layers are rebuilt here from torch primitives under their own names, as the reference
code defines them (the authors' seq-first ``nn.MultiheadAttention`` and norm1/2/3 order, detrex's
``attentions``/``norms``/``ffns``), and compared with dino_d2's layers on random inputs.
"""

import pytest
import torch
import torch.nn.functional as F
from checkpoint_layouts import SMALL, authors_state_dict, build_model, detrex_state_dict
from torch import nn

from dino_d2.checkpoint import convert_checkpoint
from dino_d2.checkpoint.classes import coco_category_ids
from dino_d2.layers.deformable_attention import MultiScaleDeformableAttention
from dino_d2.modeling.transformer import MultiScaleLevels

SHAPES = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]])
HEADS = 8
# The same geometry for dino_d2's layers: a batch of two unpadded images.
LEVELS = MultiScaleLevels.from_masks([torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES])

# Source names of the sub-blocks of one layer: attention, norm after it, FFN linears, FFN norm.
NAMES = {
    "idea": {
        "encoder": dict(
            attn="self_attn.", attn_norm="norm1.", fc1="linear1.", fc2="linear2.", ffn_norm="norm2."
        ),
        "decoder": dict(
            self_attn="self_attn.",
            self_norm="norm2.",
            cross_attn="cross_attn.",
            cross_norm="norm1.",
            fc1="linear1.",
            fc2="linear2.",
            ffn_norm="norm3.",
        ),
    },
    "detrex": {
        "encoder": dict(
            attn="attentions.0.",
            attn_norm="norms.0.",
            fc1="ffns.0.layers.0.0.",
            fc2="ffns.0.layers.1.",
            ffn_norm="norms.1.",
        ),
        "decoder": dict(
            self_attn="attentions.0.attn.",
            self_norm="norms.0.",
            cross_attn="attentions.1.",
            cross_norm="norms.1.",
            fc1="ffns.0.layers.0.0.",
            fc2="ffns.0.layers.1.",
            ffn_norm="norms.2.",
        ),
    },
}


@pytest.fixture(scope="module", params=["idea", "detrex"])
def converted(request):
    source = request.param
    if source == "idea":
        state = build_model(SMALL).state_dict()
        checkpoint = authors_state_dict(state)
    else:
        state = build_model(SMALL + ["model.transformer.decoder.share_heads=False"]).state_dict()
        checkpoint = detrex_state_dict(state)
    result = convert_checkpoint(source, {"model": checkpoint})
    model = result.build_model().eval()
    model.load_state_dict(result.state_dict, strict=True)
    return source, checkpoint, model


def sub(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"])


def ffn(x, state, names):
    hidden = F.relu(F.linear(x, state[names["fc1"] + "weight"], state[names["fc1"] + "bias"]))
    return F.linear(hidden, state[names["fc2"] + "weight"], state[names["fc2"] + "bias"])


def deformable_attention(state, embed_dim):
    attention = MultiScaleDeformableAttention(
        embed_dim=embed_dim, num_heads=HEADS, num_levels=4, num_points=4
    )
    attention.load_state_dict(state)
    return attention.eval()


def inputs(embed_dim, num_queries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = int(SHAPES.prod(1).sum())
    memory = torch.randn(2, total, embed_dim, generator=generator)
    query = torch.randn(2, num_queries, embed_dim, generator=generator)
    pos = torch.randn(2, num_queries, embed_dim, generator=generator)
    boxes = torch.rand(2, num_queries, 1, 4, generator=generator).expand(-1, -1, 4, -1) * 0.5 + 0.2
    mask = torch.rand(num_queries, num_queries, generator=generator) > 0.6
    mask.fill_diagonal_(False)
    return memory, query, pos, boxes.contiguous(), mask


@torch.no_grad()
def test_encoder_layer_matches_source(converted):
    source, checkpoint, model = converted
    prefix = "transformer.encoder.layers.1."
    state, names = sub(checkpoint, prefix), NAMES[source]["encoder"]
    embed_dim = model.transformer.embed_dim
    src, _, _, _, _ = inputs(embed_dim, 1)
    pos = torch.randn_like(src)
    points = torch.rand(2, src.shape[1], 4, 2)

    attention = deformable_attention(sub(state, names["attn"]), embed_dim)
    expected = layer_norm(
        src + attention(src + pos, points, src, LEVELS), state, names["attn_norm"]
    )
    expected = layer_norm(expected + ffn(expected, state, names), state, names["ffn_norm"])

    ours = model.transformer.encoder.layers[1](src, pos, points, LEVELS)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_decoder_layer_matches_source_seq_first_attention(converted):
    source, checkpoint, model = converted
    prefix = "transformer.decoder.layers.2."
    state, names = sub(checkpoint, prefix), NAMES[source]["decoder"]
    embed_dim = model.transformer.embed_dim
    memory, query, pos, boxes, mask = inputs(embed_dim, 12, seed=1)

    self_attention = nn.MultiheadAttention(embed_dim, HEADS).eval()  # seq-first (Q, N, C)
    self_attention.load_state_dict(sub(state, names["self_attn"]))
    cross_attention = deformable_attention(sub(state, names["cross_attn"]), embed_dim)
    tgt, tgt_pos = query.transpose(0, 1), pos.transpose(0, 1)
    attended = self_attention(tgt + tgt_pos, tgt + tgt_pos, tgt, attn_mask=mask)[0]
    tgt = layer_norm(tgt + attended, state, names["self_norm"])
    attended = cross_attention((tgt + tgt_pos).transpose(0, 1), boxes, memory, LEVELS).transpose(
        0, 1
    )
    tgt = layer_norm(tgt + attended, state, names["cross_norm"])
    tgt = layer_norm(tgt + ffn(tgt, state, names), state, names["ffn_norm"])

    ours = model.transformer.decoder.layers[2](query, pos, boxes, memory, LEVELS, attn_mask=mask)
    torch.testing.assert_close(ours, tgt.transpose(0, 1), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_class_heads_give_the_source_logits_of_each_class(converted):
    source, checkpoint, model = converted
    embed_dim = model.transformer.embed_dim
    features = torch.randn(5, embed_dim)
    columns = coco_category_ids() if source == "idea" else list(range(80))
    last = 3  # SMALL has 3 decoder layers; detrex's encoder head comes after them
    heads = {
        "idea": [
            ("class_embed.1.", model.transformer.decoder.class_embed[1]),
            ("transformer.enc_out_class_embed.", model.transformer.query_selection.class_embed),
        ],
        "detrex": [
            ("class_embed.1.", model.transformer.decoder.class_embed[1]),
            (f"class_embed.{last}.", model.transformer.query_selection.class_embed),
        ],
    }[source]
    for prefix, head in heads:
        expected = F.linear(features, checkpoint[prefix + "weight"], checkpoint[prefix + "bias"])
        torch.testing.assert_close(head(features), expected[:, columns], rtol=0, atol=0)
