import math

import torch
import torch.nn.functional as F

from dino_d2.layers.multi_scale_levels import MultiScaleLevels
from dino_d2.modeling.transformer.query_selection import (
    MixedQuerySelection,
    gen_encoder_output_proposals,
)

C, K = 16, 3


def _levels(mask, shapes):
    """MultiScaleLevels of a flat (N, S) padding mask and (L, 2) level shapes."""
    masks, start = [], 0
    for h, w in shapes.tolist():
        masks.append(mask[:, start : start + h * w].view(-1, h, w))
        start += h * w
    return MultiScaleLevels.from_masks(masks)


def _proposals(memory, mask, shapes):
    return gen_encoder_output_proposals(memory, _levels(mask, shapes))


def _select(selection, memory, mask, shapes):
    out = selection(memory, _levels(mask, shapes))
    return out.content, out.anchors, out.enc_logits, out.enc_boxes


def _logit(p):
    return math.log(p / (1 - p))


def test_proposals_hand_computation():
    # Level 0: 2 x 3 with the last column padded for image 1; level 1: 1 x 2 unpadded.
    shapes = torch.tensor([[2, 3], [1, 2]])
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, [2, 5]] = True
    memory = torch.randn(2, 8, C)
    out_memory, proposals, valid = _proposals(memory, mask, shapes)
    assert proposals.shape == (2, 8, 4) and valid.shape == (2, 8)
    # Image 1, level 0, pixel (row 1, col 1): centre (1.5 / 2, 1.5 / 2), size 0.05.
    expected = torch.tensor([_logit(0.75), _logit(0.75), _logit(0.05), _logit(0.05)])
    torch.testing.assert_close(proposals[1, 4], expected)
    # Image 0, level 1, pixel (0, 1): centre (1.5 / 2, 0.5 / 1), size 0.1.
    expected = torch.tensor([_logit(0.75), _logit(0.5), _logit(0.1), _logit(0.1)])
    torch.testing.assert_close(proposals[0, 7], expected)
    # Padded tokens: invalid, proposal +inf, memory zeroed.
    assert not valid[1, 2] and not valid[1, 5] and valid[0].all()
    assert torch.isinf(proposals[1, [2, 5]]).all() and (proposals[1, [2, 5]] > 0).all()
    assert (out_memory[1, [2, 5]] == 0).all()
    torch.testing.assert_close(out_memory[valid], memory[valid])


def test_border_proposals_are_invalid():
    # A 1 x 60 map: 0.5 / 60 < 0.01 and 59.5 / 60 > 0.99, so both end columns are invalid.
    _, proposals, valid = _proposals(
        torch.randn(1, 60, C), torch.zeros(1, 60, dtype=torch.bool), torch.tensor([[1, 60]])
    )
    assert valid[0, 1:59].all() and not valid[0, 0] and not valid[0, 59]
    assert torch.isinf(proposals[0, [0, 59]]).all()


def _favour_zeroed_memory(selection):
    """Weights under which a token with zeroed memory (padded or invalid) gets the largest class
    logit: its projected feature is LayerNorm(bias), exactly aligned with the class weights."""
    with torch.no_grad():
        bias = torch.randn(C)
        selection.enc_output.bias.copy_(bias * 10)
        selection.enc_output.weight.mul_(0.1)
        direction = F.layer_norm(bias, (C,))
        selection.class_embed.weight.copy_(direction.expand(K, C))
        selection.class_embed.bias.zero_()
    return selection


def _all_scores(selection, memory, mask, shapes):
    out_memory, _, _ = _proposals(memory, mask, shapes)
    feats = selection.enc_output_norm(selection.enc_output(out_memory))
    return selection.class_embed(feats).max(-1)[0]


def test_never_selects_padded_tokens():
    torch.manual_seed(0)
    selection = _favour_zeroed_memory(
        MixedQuerySelection(embed_dim=C, num_classes=K, num_queries=5)
    )
    shapes = torch.tensor([[4, 5], [2, 3]])
    mask = torch.zeros(2, 26, dtype=torch.bool)
    level0 = mask[:, :20].view(2, 4, 5)
    level0[1, 2:] = True
    level0[1, :, 3:] = True
    mask[1, 20:] = torch.tensor([False, False, True, True, True, True])
    memory = torch.randn(2, 26, C)
    with torch.no_grad():
        scores = _all_scores(selection, memory, mask, shapes)
        content, anchors, enc_logits, enc_boxes = _select(selection, memory, mask, shapes)
    # Precondition: without the exclusion the padded tokens would win.
    assert mask[1][scores[1].topk(5).indices].all()
    # Padded tokens have +inf proposals; none was selected.
    assert torch.isfinite(anchors).all()
    expected = scores.masked_fill(mask, -float("inf")).topk(5, dim=1).values
    torch.testing.assert_close(enc_logits.max(-1)[0], expected)
    assert content.shape == (2, 5, C) and anchors.shape == (2, 5, 4)
    assert enc_logits.shape == (2, 5, K) and enc_boxes.shape == (2, 5, 4)
    torch.testing.assert_close(content[1], selection.tgt_embed.weight)
    torch.testing.assert_close(enc_boxes, anchors.sigmoid())


def test_exclude_invalid_option():
    torch.manual_seed(0)
    shapes = torch.tensor([[1, 60]])
    mask = torch.zeros(1, 60, dtype=torch.bool)
    memory = torch.randn(1, 60, C)
    authors = _favour_zeroed_memory(MixedQuerySelection(embed_dim=C, num_classes=K, num_queries=2))
    with torch.no_grad():
        _, anchors, _, _ = _select(authors, memory, mask, shapes)
    # The authors' behaviour: the two border tokens (invalid, zeroed memory) are selected.
    assert torch.isinf(anchors).all()
    authors.exclude_invalid = True
    with torch.no_grad():
        _, anchors, _, _ = _select(authors, memory, mask, shapes)
    assert torch.isfinite(anchors).all()


def test_gradients():
    torch.manual_seed(0)
    selection = MixedQuerySelection(embed_dim=C, num_classes=K, num_queries=4)
    with torch.no_grad():
        selection.bbox_embed.layers[-1].weight.normal_()
    memory = torch.randn(1, 6, C, requires_grad=True)
    content, anchors, enc_logits, enc_boxes = _select(
        selection, memory, torch.zeros(1, 6, dtype=torch.bool), torch.tensor([[2, 3]])
    )
    assert not anchors.requires_grad
    assert enc_boxes.requires_grad and enc_logits.requires_grad and content.requires_grad
    (enc_boxes.sum() + enc_logits.sum()).backward()
    assert memory.grad.abs().sum() > 0
    assert selection.bbox_embed.layers[0].weight.grad.abs().sum() > 0


def test_fewer_tokens_than_queries_repeats_the_selection():
    torch.manual_seed(0)
    selection = MixedQuerySelection(embed_dim=16, num_classes=3, num_queries=10)
    memory = torch.randn(2, 6, 16)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    shapes = torch.tensor([[2, 2], [1, 2]])
    content, anchors, enc_logits, enc_boxes = _select(selection, memory, mask, shapes)
    assert content.shape == (2, 10, 16) and anchors.shape == (2, 10, 4)
    assert enc_logits.shape == (2, 10, 3) and enc_boxes.shape == (2, 10, 4)
    torch.testing.assert_close(enc_logits[:, :4], enc_logits[:, 6:10])
