import math

import torch

from dino_d2.layers.box_ops import inverse_sigmoid
from dino_d2.layers.multi_scale_levels import MultiScaleLevels
from dino_d2.layers.position_encoding import get_sine_pos_embed
from dino_d2.modeling.transformer.decoder import DeformableDecoder, DeformableDecoderLayer

C, K, Q = 32, 3, 6


def _decoder(**kwargs):
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(embed_dim=C, num_heads=4, ffn_dim=64, num_levels=2, num_points=2)
    decoder = DeformableDecoder(num_classes=K, layer=layer, num_layers=3, **kwargs)
    with torch.no_grad():  # the last box layer starts at zero, which would hide gradients
        for head in decoder.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.1)
            head.layers[-1].bias.normal_(0, 0.1)
    return decoder


def _inputs():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(2, 26, C, generator=g)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, 15:20] = True  # level 0 of image 1: last row padded
    query = torch.randn(2, Q, C, generator=g)
    boxes = torch.rand(2, Q, 4, generator=g) * 0.5 + 0.25
    levels = MultiScaleLevels.from_masks([mask[:, :20].view(2, 4, 5), mask[:, 20:].view(2, 2, 3)])
    return query, boxes, memory, levels


def _run(decoder, *args):
    out = decoder(*args)
    return out.pred_logits, out.pred_boxes


def test_output_shapes_and_ranges():
    out = _decoder()(*_inputs())
    logits, boxes = out.pred_logits, out.pred_boxes
    assert logits.shape == (3, 2, Q, K)
    assert out.hidden_states.shape == (3, 2, Q, C) and out.reference_boxes.shape == (3, 2, Q, 4)
    assert boxes.shape == (3, 2, Q, 4)
    assert ((boxes > 0) & (boxes < 1)).all()


def test_matches_the_authors_recurrence():
    """Refinement from the raw output, prediction from the normed output and the previous
    (undetached) box, query position from the sine embedding of the box times the level-0 valid
    ratio."""
    decoder = _decoder(share_heads=False)
    query, ref, memory, levels = _inputs()
    out_all = decoder(query, ref, memory, levels)
    logits, boxes = out_all.pred_logits, out_all.pred_boxes
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.75], [1.0, 1.0]]])
    torch.testing.assert_close(levels.valid_ratios, ratios)
    scale = torch.cat([ratios, ratios], -1)[:, None]
    out, prev = query, ref
    for i, layer in enumerate(decoder.layers):
        ref_input = ref[:, :, None] * scale
        pos = decoder.ref_point_head(get_sine_pos_embed(ref_input[:, :, 0], C // 2, 10000))
        torch.testing.assert_close(out_all.reference_boxes[i], ref)
        out = layer(out, pos, ref_input, memory, levels)
        hs = decoder.norm(out)
        torch.testing.assert_close(out_all.hidden_states[i], hs)
        torch.testing.assert_close(logits[i], decoder.class_embed[i](hs))
        expected = (decoder.bbox_embed[i](hs) + inverse_sigmoid(prev)).sigmoid()
        torch.testing.assert_close(boxes[i], expected)
        prev = (decoder.bbox_embed[i](out) + inverse_sigmoid(ref)).sigmoid()
        ref = prev.detach()


def test_look_forward_twice_gradients():
    decoder = _decoder(share_heads=False)
    logits, boxes = _run(decoder, *_inputs())
    previous_head = list(decoder.bbox_embed[0].parameters())
    # Layer 1's box loss reaches layer 0's box head (through the undetached previous box) ...
    grads = torch.autograd.grad(boxes[1].sum(), previous_head, retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # ... but not through the reference fed to layer 1's attention (detached): layer 1's class
    # logits depend on that reference only, and get no gradient into layer 0's box head.
    grads = torch.autograd.grad(
        logits[1].sum(), previous_head, retain_graph=True, allow_unused=True
    )
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # Two layers back there is no path at all.
    grads = torch.autograd.grad(boxes[2].sum(), previous_head, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # The initial boxes only reach the layer-0 prediction, never the attention.
    query, ref, *rest = _inputs()
    ref.requires_grad_()
    logits, boxes = _run(decoder, query, ref, *rest)
    assert torch.autograd.grad(boxes[0].sum(), ref, retain_graph=True)[0].abs().sum() > 0
    grad = torch.autograd.grad(logits.sum() + boxes[1:].sum(), ref, allow_unused=True)[0]
    assert grad is None or grad.abs().sum() == 0


def test_share_heads():
    shared = _decoder(share_heads=True)
    for i in range(1, 3):
        assert shared.class_embed[i] is shared.class_embed[0]
        assert shared.bbox_embed[i] is shared.bbox_embed[0]
        assert shared.class_embed[i].weight is shared.class_embed[0].weight
    independent = _decoder(share_heads=False)
    ptrs = {p.data_ptr() for head in independent.class_embed for p in head.parameters()}
    assert len(ptrs) == 2 * 3
    assert (
        independent.bbox_embed[1].layers[0].weight is not independent.bbox_embed[0].layers[0].weight
    )
    n_head = sum(p.numel() for p in independent.class_embed[0].parameters()) + sum(
        p.numel() for p in independent.bbox_embed[0].parameters()
    )
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in independent.parameters()) == n_shared + 2 * n_head
    # Both layouts have one state-dict entry per layer, as the authors' checkpoints do.
    for model in (shared, independent):
        keys = model.state_dict().keys()
        assert {f"class_embed.{i}.bias" for i in range(3)} <= keys
        assert {f"bbox_embed.{i}.layers.2.weight" for i in range(3)} <= keys


def test_head_initialization():
    layer = DeformableDecoderLayer(embed_dim=C, num_heads=4, num_levels=2)
    decoder = DeformableDecoder(num_classes=K, layer=layer, num_layers=2)
    bias = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(decoder.class_embed[0].bias, torch.full((K,), bias))
    assert decoder.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert decoder.bbox_embed[0].layers[-1].bias.abs().sum() == 0


def test_self_attention_mask_isolates_queries():
    decoder = _decoder().eval()
    query, ref, *rest = _inputs()
    blocked = torch.zeros(Q, Q, dtype=torch.bool)
    blocked[2:, :2] = True  # queries 2.. may not see queries 0, 1
    with torch.no_grad():
        logits, boxes = _run(decoder, query, ref, *rest, blocked)
        query2, ref2 = query.clone(), ref.clone()
        query2[:, :2] += 1
        ref2[:, :2] = 0.5
        logits2, boxes2 = _run(decoder, query2, ref2, *rest, blocked)
    torch.testing.assert_close(logits[:, :, 2:], logits2[:, :, 2:])
    torch.testing.assert_close(boxes[:, :, 2:], boxes2[:, :, 2:])
    assert (logits[:, :, :2] - logits2[:, :, :2]).abs().max() > 1e-3
