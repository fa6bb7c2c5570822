import itertools
import math

import pytest
import torch

from dino_d2.modeling.matcher import HungarianMatcher


def _random_boxes(n, g):
    centers = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    return torch.cat([centers, sizes], dim=1)


def _pair_cost(logits, box, label, gt_box, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """The authors' matching cost of one (query, target) pair, written out in scalars."""
    p = 1 / (1 + math.exp(-float(logits[label])))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(float(a) - float(b)) for a, b in zip(box, gt_box))

    def corners(b):
        cx, cy, w, h = (float(v) for v in b)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax1, ay1, ax2, ay2 = corners(box)
    bx1, by1, bx2, by2 = corners(gt_box)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    giou = inter / union - (hull - union) / hull
    w_class, w_bbox, w_giou = weights
    return w_bbox * l1 + w_class * (pos - neg) - w_giou * giou


def _brute_force(logits, boxes, labels, gt_boxes):
    cost = [
        [_pair_cost(logits[q], boxes[q], labels[t], gt_boxes[t]) for t in range(len(labels))]
        for q in range(len(boxes))
    ]
    best = math.inf
    for queries in itertools.permutations(range(len(boxes)), len(labels)):
        best = min(best, sum(cost[q][t] for t, q in enumerate(queries)))
    return best, cost


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_small_cases(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 5, 3
    sizes = [int(torch.randint(1, 4, (1,), generator=g)) for _ in range(2)]
    logits = 3 * torch.randn(2, num_queries, num_classes, generator=g)
    boxes = torch.stack([_random_boxes(num_queries, g) for _ in range(2)])
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)}
        for n in sizes
    ]
    indices = HungarianMatcher()(logits, boxes, targets)
    for image, (target, (query_idx, target_idx)) in enumerate(zip(targets, indices)):
        best, cost = _brute_force(logits[image], boxes[image], target["labels"], target["boxes"])
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert len(query_idx) == len(target_idx) == len(target["labels"])
        assert sorted(target_idx.tolist()) == list(range(len(target["labels"])))
        assert len(set(query_idx.tolist())) == len(query_idx)
        total = sum(cost[q][t] for q, t in zip(query_idx.tolist(), target_idx.tolist()))
        assert total == pytest.approx(best, abs=1e-4)


def test_cost_matrix_matches_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4, 6, generator=g)
    boxes = _random_boxes(4, g)
    labels = torch.tensor([5, 0, 2])
    gt_boxes = _random_boxes(3, g)
    matcher = HungarianMatcher(costs={"cost_class": 1.5, "cost_bbox": 3.0, "cost_giou": 0.5})
    cost = matcher.cost_matrix(logits, boxes, labels, gt_boxes)
    assert cost.shape == (4, 3)
    for q in range(4):
        for t in range(3):
            expected = _pair_cost(logits[q], boxes[q], labels[t], gt_boxes[t], (1.5, 3.0, 0.5))
            assert cost[q, t].item() == pytest.approx(expected, abs=1e-5)


def test_images_without_targets_get_empty_indices():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 2, generator=g)
    boxes = torch.stack([_random_boxes(4, g) for _ in range(3)])
    gt = _random_boxes(2, g)
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1, 0]), "boxes": gt},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    indices = HungarianMatcher()(logits, boxes, targets)
    assert len(indices) == 3
    for image in (0, 2):
        query_idx, target_idx = indices[image]
        assert query_idx.shape == (0,) and target_idx.shape == (0,)
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
    assert sorted(indices[1][1].tolist()) == [0, 1]


def test_all_images_empty():
    logits = torch.randn(2, 3, 2)
    boxes = torch.rand(2, 3, 4) * 0.5 + 0.1
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = HungarianMatcher()(logits, boxes, [empty, empty])
    assert [len(q) for q, _ in indices] == [0, 0]


def test_obvious_assignment_is_found():
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    logits = torch.full((3, 2), -5.0)
    logits[1, 1] = logits[2, 0] = 5.0
    targets = [{"labels": torch.tensor([0, 1]), "boxes": gt}]
    query_idx, target_idx = HungarianMatcher()(logits[None], boxes[None], targets)[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 1}


def test_rejects_all_zero_costs_and_unknown_terms():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(costs={"cost_class": 0, "cost_bbox": 0, "cost_giou": 0})
    with pytest.raises(ValueError, match=r"unknown matching cost \['cost_typo'\]"):
        HungarianMatcher(costs={"cost_class": 1.0, "cost_typo": 1.0})


def test_cost_options_reach_the_term():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4, 6, generator=g)
    boxes = _random_boxes(4, g)
    labels = torch.tensor([5, 0, 2])
    gt_boxes = _random_boxes(3, g)
    costs = {"cost_class": 1.0}
    options = {"cost_class": {"alpha": 0.5, "gamma": 1.0}}
    cost = HungarianMatcher(costs=costs, cost_options=options).cost_matrix(
        logits, boxes, labels, gt_boxes
    )
    for q in range(4):
        for t in range(3):
            expected = _pair_cost(
                logits[q], boxes[q], labels[t], gt_boxes[t], (1.0, 0.0, 0.0), alpha=0.5, gamma=1.0
            )
            assert cost[q, t].item() == pytest.approx(expected, abs=1e-5)
