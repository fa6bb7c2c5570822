"""Ties in DINO's two top-k selections, in one place for every comparison of two runs.

DINO selects twice by a top-k: the query selection keeps the k best encoder proposals in
descending order of their best class logit and pairs the i-th with the i-th learned content
query; inference keeps the top detections over queries x classes. Two runs of the same weights
that differ by float rounding (the CPU fast path against the plain model, an export against
eager, another implementation against ours) can order two scores that tie to a rounding error
either way, and at the k-th place keep either one. Neither is a difference of the models.

* Detections are compared as sets (:func:`pair_detections`); an unpaired detection is only
  accepted at the top-k cut (:func:`unpaired_beyond_cut` lists the others).
* A swap in the query selection changes the detections of the queries involved, so it cannot be
  paired away: :func:`selection_tie_order` finds the order that puts one run's selection in the
  other's when only tied proposals moved, :func:`cut_ties` the places at the k-th score where
  the two selections hold different proposals, and :func:`forced_selection` re-runs a model with
  its selection reordered (and, at the cut, other proposals put in) through a forward hook on its
  query selection. :func:`recorded_selections` records what a run selected.
* An export's selection is known by its token indices alone (its probe): :func:`forced_tokens`
  runs our model with those tokens, and :func:`selection_tie_places` accepts the result when
  every place where the tokens differ is a tie in our own scores.

It lives beside :mod:`.verify` because it serves comparisons: the fast path's parity
(:mod:`dino_d2.measure.parity`), the export verification and ``tools/verify_conversion.py``.
"""

import contextlib
import dataclasses
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "ForcedTokensError",
    "cut_ties",
    "forced_selection",
    "forced_tokens",
    "pair_detections",
    "recorded_selections",
    "selection_near_ties",
    "selection_tie_places",
    "selection_tie_order",
    "unpaired_beyond_cut",
]

Detections = Tuple[Tensor, Tensor, Tensor]  # boxes (K, 4), scores (K,), classes (K,)
Unpaired = List[Tuple[float, int]]  # (score, class) of detections without a counterpart


def pair_detections(
    ours: Detections,
    theirs: Detections,
    score_tolerance: float,
    box_tolerance: float,
    pairs: Optional[List[Tuple[int, int]]] = None,
) -> Tuple[List[float], List[float], Unpaired, Unpaired]:
    """Pairs our detections with theirs: each pair of the same class, scores within
    ``score_tolerance`` and boxes within ``box_tolerance`` in every coordinate, as many pairs as
    possible and, among those, the closest boxes.

    A greedy pass (each detection takes its closest free partner) can strand a detection when
    several of one class have near-equal scores and boxes, as a model with random weights gives:
    the pairing is an assignment per class (scipy's ``linear_sum_assignment``) instead.

    Args:
        ours, theirs: ``(boxes (K, 4), scores (K,), classes (K,))`` (anything after those three
            is ignored).
        pairs: if given, each pair's ``(our index, their index)`` is appended to it.

    Returns:
        ``(score_diffs, box_diffs, unpaired, their_unpaired)``: the absolute differences of the
        pairs, and the unpaired detections of each side as ``(score, class)`` lists.
    """
    # Imported here: loading and running an export does not need scipy; comparing it does.
    from scipy.optimize import linear_sum_assignment

    boxes, scores, classes = (t.detach().double().cpu() for t in ours[:3])
    their_boxes, their_scores, their_classes = (t.detach().double().cpu() for t in theirs[:3])
    paired = torch.zeros(len(scores), dtype=torch.bool)
    their_paired = torch.zeros(len(their_scores), dtype=torch.bool)
    score_diffs, box_diffs = [], []
    for label in torch.unique(torch.cat([classes, their_classes])):
        mine = torch.nonzero(classes == label).flatten()
        other = torch.nonzero(their_classes == label).flatten()
        if not len(mine) or not len(other):
            continue
        score_gap = (scores[mine, None] - their_scores[None, other]).abs()
        box_gap = (boxes[mine, None] - their_boxes[None, other]).abs().amax(-1)
        feasible = (score_gap <= score_tolerance) & (box_gap <= box_tolerance)
        # Infeasible pairs cost more than any set of feasible ones: the most pairs first, then
        # the closest boxes.
        cost = torch.where(
            feasible, box_gap, torch.full_like(box_gap, 1 + len(mine) * box_tolerance)
        )
        rows, cols = linear_sum_assignment(cost.numpy())
        for i, j in zip(rows.tolist(), cols.tolist()):
            if feasible[i, j]:
                paired[mine[i]] = their_paired[other[j]] = True
                score_diffs.append(float(score_gap[i, j]))
                box_diffs.append(float(box_gap[i, j]))
                if pairs is not None:
                    pairs.append((int(mine[i]), int(other[j])))
    unpaired = [(float(s), int(c)) for s, c in zip(scores[~paired], classes[~paired])]
    their_unpaired = [
        (float(s), int(c))
        for s, c in zip(their_scores[~their_paired], their_classes[~their_paired])
    ]
    return score_diffs, box_diffs, unpaired, their_unpaired


def unpaired_beyond_cut(
    unpaired: Sequence[Tuple[float, int]], cut: float, tolerance: float
) -> Unpaired:
    """The unpaired detections that are not ties at the top-k cut: those scoring more than
    ``tolerance`` above ``cut``, the lowest kept score of either run."""
    return [d for d in unpaired if d[0] > cut + tolerance]


def selection_tie_places(
    scores: Tensor, their_scores: Tensor, indices: Tensor, their_indices: Tensor, tolerance: float
) -> Optional[int]:
    """How many places of the query selection hold another token in the other run, when each of
    them is a tie; None when one is not.

    A place ties when the other run's token there, scored in our run, scores within
    ``tolerance`` of ours (or equal, -inf for padding): tied proposals in another order, or
    another of the proposals tied at the k-th score. The other run's selection, scored by ours,
    is then a top-k of our scores up to ``tolerance``.

    Args:
        scores: (..., k) our selected tokens' scores (best class logit), in our order.
        their_scores: (..., k) the other run's selected tokens' scores in our run (what
            :func:`forced_tokens` yields).
        indices, their_indices: (..., k) the tokens each run selected.
        tolerance: the score difference counted as a tie.
    """
    differ = indices != their_indices.to(indices.device)
    their_scores = their_scores.to(scores.device, scores.dtype)
    tied = (their_scores == scores) | ((their_scores - scores).abs() <= tolerance)
    if bool((differ & ~tied).any()):
        return None
    return int(differ.sum())


def selection_near_ties(selections: Sequence, tolerance: float) -> int:
    """How many selected proposals score within ``tolerance`` of the next one in rank.

    Such proposals may come out of the top-k in another order in another runtime, and each
    learned content query goes with its rank: the swapped queries' detections then differ. With
    random or barely trained weights most of the selection ties (a randomly built DINO-R50 had
    617 of its 900 proposals within 1e-4 of the next one).

    Args:
        selections: :class:`SelectedQueries` (``enc_logits`` (N, k, K)), as
            :func:`recorded_selections` records them.
        tolerance: the score (best class logit) difference counted as a tie.
    """
    count = 0
    for selection in selections:
        ranked = selection.enc_logits.detach().float().amax(-1).sort(-1, descending=True).values
        count += int((ranked[..., :-1] - ranked[..., 1:] <= tolerance).sum())
    return count


def selection_tie_order(
    boxes: Tensor, scores: Tensor, their_boxes: Tensor, tolerance: float
) -> Optional[Tensor]:
    """The order that puts our selected proposals in theirs, when only tied ones moved.

    A proposal of ours found at another place of their selection (the same refined box within
    ``tolerance``) is moved there when our scores at both places agree within ``tolerance``;
    other differences are left for the comparison to report.

    Args:
        boxes: (k, 4) our selected proposals' boxes, normalized cxcywh.
        scores: (k,) their scores (best class logit) in our run.
        their_boxes: (k, 4) the other run's selected proposals' boxes.

    Returns:
        (k,) int64, position j of the reordered selection taking our proposal ``order[j]``; None
        when nothing moved or the moves are not a permutation.
    """
    k = len(boxes)
    index = torch.arange(k)
    wrong = ((boxes - their_boxes).abs().amax(1) > tolerance).nonzero()[:, 0]
    for i in wrong.tolist():
        distance = (their_boxes[wrong] - boxes[i]).abs().amax(1)
        tied = (scores[wrong] - scores[i]).abs() <= tolerance
        distance = distance.masked_fill(~tied, float("inf"))
        j = int(distance.argmin())
        if float(distance[j]) <= tolerance:
            index[i] = wrong[j]
    if torch.equal(index, torch.arange(k)) or len(index.unique()) != k:
        return None
    return torch.argsort(index)


def cut_ties(
    boxes: Tensor, scores: Tensor, their_boxes: Tensor, their_scores: Tensor, tolerance: float
) -> Optional[Tensor]:
    """The places where the two selections hold different proposals, when all of them score
    within ``tolerance`` of their k-th (last kept) score in both runs: ties at the cut, where
    either proposal may be kept. Run after :func:`selection_tie_order`'s reordering.

    Args:
        boxes, scores: (k, 4) boxes and (k,) scores of our selected proposals.
        their_boxes, their_scores: the same of theirs.

    Returns:
        (P,) int64 positions, or None when the selections agree or differ elsewhere.
    """
    wrong = ((boxes - their_boxes).abs().amax(1) > tolerance).nonzero()[:, 0]
    if not len(wrong):
        return None
    cut = float(their_scores[-1])
    at_cut = ((scores[wrong] - cut).abs() <= tolerance) & (
        (their_scores[wrong] - cut).abs() <= tolerance
    )
    return wrong if bool(at_cut.all()) else None


@contextlib.contextmanager
def recorded_selections(model: nn.Module) -> Iterator[List]:
    """Within the block, every :class:`SelectedQueries` that ``model``'s query selection
    (``model.transformer.query_selection``) returns is appended to the yielded list."""
    selections = []
    handle = model.transformer.query_selection.register_forward_hook(
        lambda module, inputs, output: selections.append(output)
    )
    try:
        yield selections
    finally:
        handle.remove()


class ForcedTokensError(ValueError):
    """Tokens that :func:`forced_tokens` cannot put in the run's selection."""


@contextlib.contextmanager
def forced_tokens(model: nn.Module, indices: Tensor) -> Iterator[List[Tensor]]:
    """Within the block, ``model``'s query selection keeps the tokens ``indices`` (N, k), in
    that order, instead of its own top-k: our model run with another run's selection (an
    export's, read by its probe), everything else computed as usual. The yielded list receives,
    for each run, the (N, k) scores that the selection ranked those tokens by (best class logit,
    -inf where excluded: padding).

    Args:
        model: a DINO whose ``transformer.query_selection`` ranks through a ``rank(scores)``
            method (:class:`~dino_d2.modeling.MixedQuerySelection`).
        indices: (N, k) int64 token positions; N must be the batch size of the run.

    Raises:
        TypeError: a query selection without ``rank``.
        ForcedTokensError: (in the run) ``indices`` of another batch size, or outside the
            run's tokens.
    """
    selection = model.transformer.query_selection
    if not callable(getattr(selection, "rank", None)):
        raise TypeError(
            f"{type(selection).__name__} has no rank(scores) method to put another selection in"
        )

    def rank(scores: Tensor) -> Tensor:
        if scores.shape[0] != indices.shape[0]:
            raise ForcedTokensError(
                f"forced_tokens: indices for {indices.shape[0]} images, the batch has "
                f"{scores.shape[0]}"
            )
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < scores.shape[1]:
            raise ForcedTokensError(
                f"forced_tokens: token indices must lie in [0, {scores.shape[1]}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        index = indices.to(scores.device)
        scored.append(scores.gather(1, index))
        return index

    scored = []
    previous = selection.__dict__.get("rank")
    selection.rank = rank
    try:
        yield scored
    finally:
        if previous is None:
            del selection.rank
        else:
            selection.rank = previous


@contextlib.contextmanager
def forced_selection(
    model: nn.Module,
    order: Optional[Tensor] = None,
    substitute: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Iterator[None]:
    """Within the block, ``model``'s query selection returns its proposals reordered and, at
    some places, replaced; the content queries stay.

    Args:
        model: a DINO (its ``transformer.query_selection`` is hooked).
        order: optional (N, k) int64, position j of image i taking proposal ``order[i, j]``
            (anchors, encoder logits and boxes, token indices).
        substitute: optional ``(positions (P,), enc_boxes (P, 4), enc_logits (P, K))`` put at
            those positions of the first image (after the reordering), with the anchors that
            give those boxes.
    """

    def hook(module, inputs, output):
        changed = {
            "anchors": output.anchors,
            "enc_logits": output.enc_logits,
            "enc_boxes": output.enc_boxes,
            "indices": output.indices,
        }
        if order is not None:
            index = order.to(output.indices.device)
            for name, t in changed.items():
                shape = (*index.shape, *[1] * (t.dim() - 2))
                changed[name] = torch.gather(t, 1, index.view(shape).expand_as(t))
        if substitute is not None:
            positions, boxes, logits = substitute
            anchors, enc_boxes, enc_logits = (
                changed[name].clone() for name in ("anchors", "enc_boxes", "enc_logits")
            )
            enc_boxes[0, positions] = boxes.to(enc_boxes.dtype)
            anchors[0, positions] = torch.logit(boxes.double()).to(anchors.dtype)
            enc_logits[0, positions] = logits.to(enc_logits.dtype)
            changed.update(anchors=anchors, enc_boxes=enc_boxes, enc_logits=enc_logits)
        return dataclasses.replace(output, **changed)

    handle = model.transformer.query_selection.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
