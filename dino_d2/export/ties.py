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

It lives beside :mod:`.verify` because it serves comparisons: the fast path's parity
(:mod:`dino_d2.measure.parity`), the export verification and ``tools/verify_conversion.py``.
"""

import contextlib
import dataclasses
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "cut_ties",
    "forced_selection",
    "pair_detections",
    "recorded_selections",
    "selection_index_order",
    "selection_near_ties",
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


def selection_index_order(
    indices: Tensor, scores: Tensor, their_indices: Tensor, tolerance: float
) -> Optional[Tensor]:
    """The order that puts our selected tokens in theirs, when both runs selected the same tokens
    and only tied ones moved: :func:`selection_tie_order` for a run whose selected token indices
    are known (an export's, read by :func:`dino_d2.export.onnx.selection_probe`).

    Args:
        indices: (k,) our selected tokens.
        scores: (k,) their scores (best class logit) in our run.
        their_indices: (k,) the other run's selected tokens.

    Returns:
        (k,) int64, position j taking our proposal ``order[j]``; the identity when nothing
        moved; None when the runs selected other tokens or a moved token does not tie with the
        one it displaced.
    """
    position = {token: j for j, token in enumerate(indices.tolist())}
    if len(position) != len(indices) or set(their_indices.tolist()) != set(position):
        return None
    order = torch.tensor([position[token] for token in their_indices.tolist()])
    if bool(((scores[order] - scores).abs() > tolerance).any()):
        return None
    return order


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
