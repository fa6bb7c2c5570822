"""Tie handling of DINO's two top-k selections (dino_d2.export.ties)."""

from types import SimpleNamespace

import pytest
import torch

from detectron2.config import instantiate

from dino_d2.export.ties import (
    ForcedTokensError,
    cut_ties,
    forced_selection,
    forced_tokens,
    recorded_selections,
    selection_near_ties,
    selection_tie_places,
    selection_tie_order,
    unpaired_beyond_cut,
)


def _selection(k=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.rand(k, 4, generator=generator)
    scores = torch.linspace(3.0, 1.0, k)
    return boxes, scores


def test_a_swap_of_tied_proposals_is_undone_and_others_are_not():
    boxes, scores = _selection()
    theirs = boxes[[0, 2, 1, 3, 4, 5]]
    assert selection_tie_order(boxes, scores, boxes, 1e-4) is None
    # Positions 1 and 2 hold the same proposals in the other order, but score apart: not a tie.
    assert selection_tie_order(boxes, scores, theirs, 1e-4) is None
    tied = scores.clone()
    tied[2] = tied[1] + 5e-5
    order = selection_tie_order(boxes, tied, theirs, 1e-4)
    assert order.tolist() == [0, 2, 1, 3, 4, 5]
    assert torch.equal(boxes[order], theirs)


def test_only_ties_at_the_cut_may_hold_other_proposals():
    boxes, scores = _selection()
    their_boxes = boxes.clone()
    their_boxes[-1] = torch.tensor([0.5, 0.5, 0.1, 0.1])
    their_scores = scores.clone()
    assert cut_ties(boxes, scores, boxes, scores, 1e-4) is None
    assert cut_ties(boxes, scores, their_boxes, their_scores, 1e-4).tolist() == [5]
    their_boxes[0] = 0.0  # a difference far above the cut
    assert cut_ties(boxes, scores, their_boxes, their_scores, 1e-4) is None
    assert unpaired_beyond_cut([(0.5, 1), (0.30001, 2)], 0.3, 1e-4) == [(0.5, 1)]


def test_a_forced_selection_reorders_the_model_s_queries(tiny_dino_config):
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config().model).eval()
    captured = []
    model.transformer.register_forward_hook(lambda m, i, out: captured.append(out))
    batch = [{"image": torch.rand(3, 64, 96) * 255}]
    order = torch.arange(model.num_queries)[None].clone()
    order[0, :2] = torch.tensor([1, 0])
    with torch.no_grad(), recorded_selections(model) as selections:
        model(batch)
        with forced_selection(model, order):
            model(batch)
    plain, forced = captured
    assert len(selections) == 2 and torch.equal(selections[0].indices, selections[1].indices)
    assert torch.equal(forced.enc_boxes[0, :2], plain.enc_boxes[0, [1, 0]])
    assert torch.equal(forced.enc_boxes[0, 2:], plain.enc_boxes[0, 2:])
    # The learned content queries stay: the two swapped queries give other class logits.
    assert not torch.allclose(forced.pred_logits[-1, 0, :2], plain.pred_logits[-1, 0, [1, 0]])


def test_near_ties_in_a_selection_are_counted(tiny_dino_config):
    """Adjacent ranks within the tolerance count, over images and calls; classes' best logit
    ranks. The tiny model's own selection, with its encoder class head zeroed, is all ties."""
    logits = torch.tensor([[[3.0, 0.0], [0.0, 2.99995], [2.0, 1.0], [1.99999, 0.0]]])
    assert selection_near_ties([SimpleNamespace(enc_logits=logits)], 1e-4) == 2
    assert selection_near_ties([SimpleNamespace(enc_logits=logits)], 1e-6) == 0
    two = SimpleNamespace(enc_logits=torch.cat([logits, logits[:, [2, 0, 3, 1]]]))
    assert selection_near_ties([two, SimpleNamespace(enc_logits=logits)], 1e-4) == 6

    torch.manual_seed(0)
    model = instantiate(tiny_dino_config().model).eval()
    with torch.no_grad(), recorded_selections(model) as selections:
        model([{"image": torch.rand(3, 64, 96) * 255}])
    k = selections[0].enc_logits.shape[1]
    untied = selection_near_ties(selections, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == model.num_classes:
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    with torch.no_grad(), recorded_selections(model) as selections:
        model([{"image": torch.rand(3, 64, 96) * 255}])
    assert untied < k - 1 and selection_near_ties(selections, 0.0) == k - 1


def test_another_run_s_tokens_are_accepted_only_where_they_tie():
    """A place holding another token counts when that token, in our scores, ties with ours
    there: a swap of tied tokens, or another token tied at the k-th score; -inf (padding) ties
    with -inf only."""
    indices = torch.tensor([[7, 3, 9, 4]])
    scores = torch.tensor([[3.0, 2.99995, 2.0, 1.0]])
    assert selection_tie_places(scores, scores, indices, indices, 1e-4) == 0
    swapped = torch.tensor([[3, 7, 9, 4]])
    assert selection_tie_places(scores, scores[:, [1, 0, 2, 3]], indices, swapped, 1e-4) == 2
    assert selection_tie_places(scores, scores[:, [1, 0, 2, 3]], indices, swapped, 1e-6) is None
    # 9 and 4 do not tie.
    untied = torch.tensor([[7, 3, 4, 9]])
    assert selection_tie_places(scores, scores[:, [0, 1, 3, 2]], indices, untied, 1e-4) is None
    # Token 5 in the last place, scoring 0.99999 in our run: a tie at the cut; 0.9 is not.
    cut = torch.tensor([[7, 3, 9, 5]])
    theirs = torch.tensor([[3.0, 2.99995, 2.0, 0.99999]])
    assert selection_tie_places(scores, theirs, indices, cut, 1e-4) == 1
    assert selection_tie_places(scores, theirs - 0.1, indices, cut, 1e-4) is None
    padded = torch.tensor([[3.0, 2.0, float("-inf"), float("-inf")]])
    assert selection_tie_places(padded, padded, indices, untied, 1e-4) == 2
    assert selection_tie_places(padded, padded[:, [0, 2, 1, 3]], indices, untied, 1e-4) is None


def test_forced_tokens_run_the_model_with_another_selection(tiny_dino_config):
    """The model selects the given tokens in the given order, reports the scores it ranks them
    by, and is left as it was; tokens it does not have, or for another batch size, are refused."""
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config().model).eval()
    batch = [{"image": torch.rand(3, 64, 96) * 255}]
    with torch.no_grad(), recorded_selections(model) as selections:
        model(batch)
        ours = selections[0]
        tokens = ours.indices.flip(1)
        with forced_tokens(model, tokens) as scored:
            model(batch)
        model(batch)
    plain, forced, after = selections
    assert torch.equal(forced.indices, tokens)
    assert torch.equal(forced.enc_boxes, plain.enc_boxes.flip(1))
    assert torch.equal(scored[0], plain.enc_logits.amax(-1).flip(1))
    assert torch.equal(after.indices, plain.indices)
    assert "rank" not in vars(model.transformer.query_selection)
    for wrong in (torch.cat([tokens, tokens]), tokens.clamp(max=-1), tokens + 10**6):
        with pytest.raises(ForcedTokensError), forced_tokens(model, wrong), torch.no_grad():
            model(batch)
