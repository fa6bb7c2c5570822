"""Pairing of two runs' detections (dino_d2.export.verify): the proof every export relies on."""

import pytest
import torch

from dino_d2.export.ties import pair_detections
from dino_d2.export.verify import compare_detections


def _detections(boxes, scores, classes):
    return (
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(classes),
    )


def test_near_duplicates_all_pair_where_a_greedy_pass_strands_one():
    """Our first box is close to both of theirs; taking its closest partner greedily would leave
    our second box, which only fits their first, without one."""
    ours = _detections([[0, 0, 10, 10.004], [0, 0, 10, 9.996]], [0.5, 0.5], [3, 3])
    theirs = _detections([[0, 0, 10, 10.003], [0, 0, 10, 10.012]], [0.5, 0.5], [3, 3])
    score_diffs, box_diffs, unpaired, their_unpaired = pair_detections(ours, theirs, 1e-4, 1e-2)
    assert not unpaired and not their_unpaired and len(score_diffs) == 2
    assert max(box_diffs) <= 1e-2


def test_class_score_and_box_must_all_agree():
    ours = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], [0.9, 0.8, 0.7], [1, 2, 1])
    theirs = _detections(
        [[0, 0, 10, 10], [5, 5, 20, 20.5], [1, 1, 2, 2]], [0.9, 0.8, 0.7], [1, 2, 4]
    )
    score_diffs, box_diffs, unpaired, their_unpaired = pair_detections(ours, theirs, 1e-4, 1e-2)
    assert len(score_diffs) == 1  # only the first: a box 0.5 px off, and another class
    assert sorted(unpaired) == [(0.699999988079071, 1), (0.800000011920929, 2)]
    assert sorted(c for _, c in their_unpaired) == [2, 4]


def test_only_a_tie_at_the_top_k_cut_may_go_unpaired():
    reference = _detections([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], [0.9, 0.5, 0.3], [0, 1, 2])
    # The last detection swapped for another of a score tied at the cut: accepted.
    tied = _detections([[0, 0, 4, 4], [1, 1, 5, 5], [3, 3, 7, 7]], [0.9, 0.5, 0.30001], [0, 1, 5])
    assert compare_detections([(reference, tied, "tie")]).passed
    # One above the cut without a counterpart: a failure that names it.
    wrong = _detections([[0, 0, 4, 4], [1, 1, 5, 5.5], [2, 2, 6, 6]], [0.9, 0.5, 0.3], [0, 1, 2])
    comparison = compare_detections([(reference, wrong, "image 0")])
    assert not comparison.passed and "image 0" in comparison.problems[0]


def test_per_detection_maps_are_compared_by_iou_on_the_pairs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    scores, classes = torch.tensor([0.9, 0.8]), torch.tensor([1, 2])
    masks = -torch.ones(2, 8, 8)
    masks[0, :4, :4] = 1
    masks[1, 4:, 4:] = 1
    # The candidate lists the detections in the other order; its second mask lost one row.
    flipped = masks.flip(0).clone()
    flipped[0, 4] = -1
    reference = (boxes, scores, classes, masks)
    candidate = (boxes.flip(0), scores.flip(0), classes.flip(0), flipped)
    comparison = compare_detections([(reference, candidate, "image 0")])
    assert comparison.num_masks == 2
    assert comparison.min_mask_iou == pytest.approx(12 / 16)
    assert not comparison.passed and "IoU below 0.99" in comparison.problems[0]
    assert compare_detections([(reference, (boxes, scores, classes, masks), "image 0")]).passed
