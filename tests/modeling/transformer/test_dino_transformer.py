import pytest
import torch

from dino_d2.layers.position_encoding import PositionEmbeddingSine
from dino_d2.modeling.transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    DINOTransformer,
    MixedQuerySelection,
)

K, Q, Q_DN = 5, 10, 4
KEYS = ("pred_logits", "pred_boxes", "enc_logits", "enc_boxes")
SIZES = [(8, 10), (4, 5)]  # the padded batch: two levels
SMALL = [(5, 6), (3, 3)]  # valid region of the smaller image on each level


def _build(embed_dim=64, use_checkpoint=False, scale_query_pos_by_valid_ratio=True):
    torch.manual_seed(0)
    common = dict(
        embed_dim=embed_dim, num_heads=4, ffn_dim=2 * embed_dim, num_levels=2, num_points=2
    )
    model = DINOTransformer(
        encoder=DeformableEncoder(
            layer=DeformableEncoderLayer(**common), num_layers=2, use_checkpoint=use_checkpoint
        ),
        decoder=DeformableDecoder(
            num_classes=K,
            layer=DeformableDecoderLayer(**common),
            num_layers=2,
            use_checkpoint=use_checkpoint,
            scale_query_pos_by_valid_ratio=scale_query_pos_by_valid_ratio,
        ),
        query_selection=MixedQuerySelection(embed_dim=embed_dim, num_classes=K, num_queries=Q),
        position_embedding=PositionEmbeddingSine(num_pos_feats=embed_dim // 2, temperature=20),
        num_levels=2,
        embed_dim=embed_dim,
    )
    with torch.no_grad():  # move away from the zero / identity initializations
        for head in [model.query_selection.bbox_embed, *model.decoder.bbox_embed]:
            head.layers[-1].weight.normal_(0, 0.1)
            head.layers[-1].bias.normal_(0, 0.1)
        for module in model.modules():
            if hasattr(module, "sampling_offsets"):
                module.sampling_offsets.weight.normal_(0, 0.3)
                module.attention_weights.weight.normal_(0, 0.3)
    return model


def _batch(embed_dim, valid=((SIZES[0], SIZES[1]), (SMALL[0], SMALL[1])), seed=0):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(len(valid), embed_dim, h, w, generator=g) for h, w in SIZES]
    masks = []
    for lvl, (h, w) in enumerate(SIZES):
        mask = torch.ones(len(valid), h, w, dtype=torch.bool)
        for n, per_level in enumerate(valid):
            mask[n, : per_level[lvl][0], : per_level[lvl][1]] = False
        masks.append(mask)
    return features, masks


def _run(model, *args, **kwargs):
    """The transformer's main predictions as a dict (the fields these tests compare)."""
    out = model(*args, **kwargs)
    return {key: getattr(out, key) for key in KEYS}


def _dn_inputs(embed_dim, n=2):
    g = torch.Generator().manual_seed(1)
    content = torch.randn(n, Q_DN, embed_dim, generator=g)
    boxes = torch.rand(n, Q_DN, 4, generator=g)
    mask = torch.zeros(Q_DN + Q, Q_DN + Q, dtype=torch.bool)
    mask[Q_DN:, :Q_DN] = True  # matching queries do not see the DN queries
    mask[:2, 2:Q_DN] = True  # two DN groups do not see each other
    mask[2:Q_DN, :2] = True
    return content, boxes, mask


@pytest.mark.parametrize("embed_dim", [64, 96])
@pytest.mark.parametrize("with_dn", [False, True])
def test_end_to_end_shapes(embed_dim, with_dn):
    model = _build(embed_dim)
    features, masks = _batch(embed_dim)
    kwargs = {}
    if with_dn:
        content, boxes, attn_mask = _dn_inputs(embed_dim)
        kwargs = dict(dn_content=content, dn_boxes=boxes, attn_mask=attn_mask)
    out = _run(model, features, masks, **kwargs)
    total = Q + (Q_DN if with_dn else 0)
    assert out["pred_logits"].shape == (2, 2, total, K)
    assert out["pred_boxes"].shape == (2, 2, total, 4)
    assert out["enc_logits"].shape == (2, Q, K)
    assert out["enc_boxes"].shape == (2, Q, 4)
    for value in out.values():
        assert torch.isfinite(value).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    sum(v.sum() for v in out.values()).backward()
    assert model.level_embed.grad.abs().sum() > 0
    assert model.query_selection.tgt_embed.weight.grad.abs().sum() > 0


def test_dn_queries_come_first_and_are_masked_out():
    embed_dim = 64
    model = _build(embed_dim).eval()
    features, masks = _batch(embed_dim)
    content, boxes, attn_mask = _dn_inputs(embed_dim)
    with torch.no_grad():
        plain = _run(model, features, masks)
        out = _run(model, features, masks, dn_content=content, dn_boxes=boxes, attn_mask=attn_mask)
        out2 = _run(
            model, features, masks, dn_content=content + 1, dn_boxes=boxes, attn_mask=attn_mask
        )
    # The matching queries (last Q) are blind to the DN queries: same as without them.
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key][:, :, Q_DN:], plain[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out2[key][:, :, Q_DN:], plain[key], atol=1e-5, rtol=1e-5)
    assert (out["pred_logits"][:, :, :Q_DN] - out2["pred_logits"][:, :, :Q_DN]).abs().max() > 1e-3


def _crop(features, masks, index, valid):
    feats = [f[index : index + 1, :, :h, :w] for f, (h, w) in zip(features, valid)]
    return feats, [torch.zeros(1, h, w, dtype=torch.bool) for h, w in valid]


def test_batched_equals_single():
    """Image A alone (no padding) gives what it gives next to a larger image B (A padded with
    garbage, masked), when the query position embedding ignores padding."""
    embed_dim = 64
    model = _build(embed_dim, scale_query_pos_by_valid_ratio=False).eval()
    features, masks = _batch(embed_dim)
    features = [f.clone() for f in features]
    for f, (h, w) in zip(features, SMALL):  # garbage in A's padding
        f[1, :, h:] = 50.0
        f[1, :, :, w:] = -50.0
    with torch.no_grad():
        batched = _run(model, features, masks)
        single_a = _run(model, *_crop(features, masks, 1, SMALL))
        single_b = _run(model, *_crop(features, masks, 0, SIZES))
    for key, value in batched.items():
        index = (slice(None), 1) if key.startswith("pred") else (1,)
        torch.testing.assert_close(
            value[index], single_a[key][index[:-1] + (0,)], atol=1e-5, rtol=0
        )
        index = (slice(None), 0) if key.startswith("pred") else (0,)
        torch.testing.assert_close(value[index], single_b[key][index], atol=1e-5, rtol=0)


def test_query_pos_option_only_matters_with_padding():
    embed_dim = 64
    authors = _build(embed_dim).eval()
    fixed = _build(embed_dim, scale_query_pos_by_valid_ratio=False).eval()
    fixed.load_state_dict(authors.state_dict())
    features, masks = _batch(embed_dim)
    with torch.no_grad():
        a, f = _run(authors, features, masks), _run(fixed, features, masks)
    # Image 0 is unpadded: identical. Image 1 is padded: the authors' embedding differs.
    torch.testing.assert_close(a["pred_boxes"][:, 0], f["pred_boxes"][:, 0])
    torch.testing.assert_close(a["enc_boxes"], f["enc_boxes"])
    assert (a["pred_boxes"][:, 1] - f["pred_boxes"][:, 1]).abs().max() > 1e-4


def test_gradient_checkpointing():
    embed_dim = 64
    plain = _build(embed_dim).train()
    ckpt = _build(embed_dim, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    features, masks = _batch(embed_dim)
    content, boxes, attn_mask = _dn_inputs(embed_dim)
    starts = []
    for layer in [*ckpt.encoder.layers, *ckpt.decoder.layers]:
        layer.register_forward_pre_hook(lambda *_: starts.append(1))
    results = []
    for model in (plain, ckpt):
        feats = [f.clone().requires_grad_() for f in features]
        out = _run(model, feats, masks, dn_content=content, dn_boxes=boxes, attn_mask=attn_mask)
        g = torch.Generator().manual_seed(2)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in out.values())
        loss.backward()
        results.append((out, [f.grad for f in feats], [p.grad for p in model.parameters()]))
    # 4 layers, each started once in the forward pass and once more to recompute in backward.
    assert len(starts) == 8
    (out0, fg0, pg0), (out1, fg1, pg1) = results
    for key in out0:
        torch.testing.assert_close(out0[key], out1[key])
    for a, b in zip(fg0 + pg0, fg1 + pg1):
        torch.testing.assert_close(a, b)
    starts.clear()
    with torch.no_grad():
        _run(ckpt, features, masks)
    assert len(starts) == 4


def test_output_carries_what_heads_and_losses_need():
    embed_dim = 64
    model = _build(embed_dim).eval()
    features, masks = _batch(embed_dim)
    content, boxes, attn_mask = _dn_inputs(embed_dim)
    with torch.no_grad():
        out = model(features, masks, dn_content=content, dn_boxes=boxes, attn_mask=attn_mask)
    total = Q_DN + Q
    num_tokens = sum(h * w for h, w in SIZES)
    assert out.num_dn == Q_DN
    assert out.hidden_states.shape == (2, 2, total, embed_dim)
    assert out.reference_boxes.shape == (2, 2, total, 4)
    assert out.memory.shape == (2, num_tokens, embed_dim)
    assert out.levels.shapes == SIZES
    assert out.levels.spatial_shapes.tolist() == [list(s) for s in SIZES]
    assert out.levels.level_start_index.tolist() == [0, SIZES[0][0] * SIZES[0][1]]
    assert out.levels.padding_mask.shape == (2, num_tokens)
    torch.testing.assert_close(
        out.levels.valid_ratios[1],
        torch.tensor([[w / W, h / H] for (h, w), (H, W) in zip(SMALL, SIZES)]),
    )
    # The selected proposals are valid tokens of each image, and their class logits are the
    # encoder head's at those tokens.
    assert out.selected_indices.shape == (2, Q) and out.selected_indices.dtype == torch.int64
    assert not torch.gather(out.levels.padding_mask, 1, out.selected_indices).any()
    qs = model.query_selection
    memory = out.memory[1, out.selected_indices[1]]
    torch.testing.assert_close(
        out.enc_logits[1], qs.class_embed(qs.enc_output_norm(qs.enc_output(memory)))
    )
    # The heads read the normed hidden states.
    torch.testing.assert_close(
        out.pred_logits[-1], model.decoder.class_embed[-1](out.hidden_states[-1])
    )


def test_a_decoder_without_the_box_clamp_is_named():
    """A custom decoder must declare ``box_logit_eps`` (the denoising boxes' logit clamp)."""
    model = _build()

    class BareDecoder(torch.nn.Module):
        num_classes = K

    with pytest.raises(ValueError, match="BareDecoder.*'box_logit_eps'"):
        DINOTransformer(
            encoder=model.encoder,
            decoder=BareDecoder(),
            query_selection=model.query_selection,
            position_embedding=model.position_embedding,
            num_levels=2,
            embed_dim=64,
        )
