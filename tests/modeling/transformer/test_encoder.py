import torch

from dino_d2.layers.multi_scale_levels import MultiScaleLevels, valid_extent
from dino_d2.layers.position_encoding import PositionEmbeddingSine
from dino_d2.modeling.transformer.encoder import (
    DeformableEncoder,
    DeformableEncoderLayer,
    get_encoder_reference_points,
)

C = 32


def _layer():
    return DeformableEncoderLayer(embed_dim=C, num_heads=4, ffn_dim=64, num_levels=2, num_points=2)


def _level_masks(valid, sizes):
    """Per-level (N, H, W) masks: image n is valid on the top-left valid[n][l] rectangle."""
    masks = []
    for lvl, (h, w) in enumerate(sizes):
        m = torch.ones(len(valid), h, w, dtype=torch.bool)
        for n, per_level in enumerate(valid):
            vh, vw = per_level[lvl]
            m[n, :vh, :vw] = False
        masks.append(m)
    return masks


def _flatten(features, masks, pe):
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
    pos = torch.cat([pe(m).flatten(2).transpose(1, 2) for m in masks], 1)
    return src, pos, MultiScaleLevels.from_masks(masks)


def test_valid_extent_and_ratio():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :3, :2] = False
    mask[1] = False
    torch.testing.assert_close(valid_extent(mask), torch.tensor([[2.0, 3.0], [5.0, 4.0]]))
    levels = MultiScaleLevels.from_masks([mask, torch.zeros(2, 2, 3, dtype=torch.bool)])
    torch.testing.assert_close(
        levels.valid_ratios, torch.tensor([[[0.4, 0.75], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    )
    assert levels.shapes == [(4, 5), (2, 3)]
    assert levels.level_start_index.tolist() == [0, 20]
    assert levels.padding_mask.shape == (2, 26)


def test_reference_points_hand_computation():
    # Two levels; the image covers 2 of 4 columns and 1 of 2 rows of level 0, 1 x 1 of level 1.
    masks = _level_masks([[(1, 2), (1, 1)]], [(2, 4), (1, 2)])
    ref = get_encoder_reference_points(MultiScaleLevels.from_masks(masks))
    assert ref.shape == (1, 8 + 2, 2, 2)
    # Level-0 pixel (row 0, col 1): centre (1.5 / 2, 0.5 / 1) relative to the valid region,
    # then scaled by each level's valid ratio.
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([0.75 * 0.5, 0.5 * 0.5]))
    torch.testing.assert_close(ref[0, 1, 1], torch.tensor([0.75 * 0.5, 0.5 * 1.0]))
    # Level-1 pixel (0, 0): centre (0.5 / 1, 0.5 / 1).
    torch.testing.assert_close(ref[0, 8, 0], torch.tensor([0.5 * 0.5, 0.5 * 0.5]))


def test_valid_outputs_ignore_padded_features():
    torch.manual_seed(0)
    encoder = DeformableEncoder(layer=_layer(), num_layers=2).eval()
    with torch.no_grad():
        for layer in encoder.layers:  # non-trivial offsets and weights, reaching the padding
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.5)
            layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    sizes = [(6, 7), (3, 4)]
    masks = _level_masks([[(4, 5), (2, 3)], [(6, 7), (3, 4)]], sizes)
    pe = PositionEmbeddingSine(num_pos_feats=C // 2, temperature=20)
    features = [torch.randn(2, C, h, w) for h, w in sizes]
    src, pos, levels = _flatten(features, masks, pe)
    mask = levels.padding_mask
    with torch.no_grad():
        out = encoder(src, pos, levels)
        garbage = (
            src.masked_fill(mask[..., None], 0) + torch.randn_like(src) * 100 * mask[..., None]
        )
        out2 = encoder(garbage, pos, levels)
    valid = ~mask
    assert not torch.equal(garbage, src)
    torch.testing.assert_close(out[valid], out2[valid], atol=1e-5, rtol=1e-5)
    # Sanity: changing a valid feature does change valid outputs.
    with torch.no_grad():
        changed = src.clone()
        changed[0, 0] += 1
        out3 = encoder(changed, pos, levels)
    assert (out3[valid] - out[valid]).abs().max() > 1e-3


def test_checkpointing_same_result_and_recomputes():
    torch.manual_seed(0)
    plain = DeformableEncoder(layer=_layer(), num_layers=2)
    ckpt = DeformableEncoder(layer=_layer(), num_layers=2, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    sizes = [(4, 5), (2, 3)]
    masks = _level_masks([[(3, 4), (2, 2)], [(4, 5), (2, 3)]], sizes)
    pe = PositionEmbeddingSine(num_pos_feats=C // 2, temperature=20)
    src, pos, levels = _flatten([torch.randn(2, C, h, w) for h, w in sizes], masks, pe)
    calls = []
    for layer in ckpt.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for model in (plain, ckpt):
        x = src.clone().requires_grad_()
        out = model(x, pos, levels)
        (out * torch.arange(C)).sum().backward()
        grads = [p.grad for p in model.parameters()]
        results.append((out.detach(), x.grad, grads))
    # Two layers, each started in the forward pass and again (recomputed) in the backward pass;
    # a pre-hook, since early-stopping recomputation may never finish the layer.
    assert len(calls) == 4
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for g0, g1 in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g0, g1)

    calls.clear()
    with torch.no_grad():
        ckpt(src, pos, levels)
    ckpt.eval()
    ckpt(src, pos, levels)
    assert len(calls) == 4  # not checkpointed: one call per layer and forward
