import pytest
import torch
from torchvision.ops import box_convert

from dino_d2.modeling.denoising import ContrastiveDenoising


def _targets(sizes, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        centers = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        sizes_wh = 0.05 + 0.2 * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes_wh], dim=1)})
    return targets


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_groups_and_layout():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=8, dn_number=7)
    out = dn(_targets([2, 3]), num_queries=4, generator=_gen())
    assert out.num_groups == 7 // 3 == 2
    assert out.group_size == 6
    assert out.num_dn_queries == 12
    assert out.content.shape == (2, 12, 8)
    assert out.boxes.shape == (2, 12, 4)
    assert out.attn_mask.shape == (16, 16) and out.attn_mask.dtype == torch.bool
    query_idx, target_idx = out.positive_indices[0]
    assert query_idx.tolist() == [0, 1, 6, 7]
    assert target_idx.tolist() == [0, 1, 0, 1]
    query_idx, target_idx = out.positive_indices[1]
    assert query_idx.tolist() == [0, 1, 2, 6, 7, 8]
    assert target_idx.tolist() == [0, 1, 2, 0, 1, 2]


def test_padding_slots_are_zero_content_and_centered_box():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=8, dn_number=6)
    out = dn(_targets([1, 3]), num_queries=4, generator=_gen())
    # Image 0 has one box; in each group of 6 (3 positives then 3 negatives) slots 1, 2, 4, 5 pad.
    for group_start in (0, 6):
        for slot in (1, 2, 4, 5):
            q = group_start + slot
            assert torch.equal(out.content[0, q], torch.zeros(8))
            assert torch.equal(out.boxes[0, q], torch.full((4,), 0.5))
    assert (out.content[1].abs().sum(-1) > 0).all()


def test_without_noise_positives_and_negatives_copy_the_ground_truth():
    dn = ContrastiveDenoising(
        num_classes=5, embed_dim=8, dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.0
    )
    targets = _targets([2, 1])
    out = dn(targets, num_queries=3, generator=_gen())
    for image, target in enumerate(targets):
        for query, gt in zip(*out.positive_indices[image]):
            for q in (query, query + out.group_size // 2):  # positive, then its negative
                assert torch.equal(out.boxes[image, q], target["boxes"][gt])
                expected = dn.label_enc.weight[target["labels"][gt]]
                assert torch.equal(out.content[image, q], expected)


@pytest.mark.parametrize("sizes,groups", [([2, 3], 2), ([1], 5), ([2, 0, 1], 3)])
def test_attention_mask_blocks_leaks(sizes, groups):
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=groups * max(sizes))
    num_queries = 5
    out = dn(_targets(sizes), num_queries=num_queries, generator=_gen())
    mask, num_dn, size = out.attn_mask, out.num_dn_queries, out.group_size
    assert out.num_groups == groups
    assert mask.shape == (num_dn + num_queries, num_dn + num_queries)
    assert mask[num_dn:, :num_dn].all(), "a matching query sees a DN query"
    assert not mask[num_dn:, num_dn:].any(), "matching queries must see each other"
    assert not mask[:num_dn, num_dn:].any(), "DN queries see the matching queries (authors)"
    for a in range(groups):
        rows = slice(a * size, (a + 1) * size)
        for b in range(groups):
            cols = slice(b * size, (b + 1) * size)
            if a == b:
                assert not mask[rows, cols].any(), "queries within a group must see each other"
            else:
                assert mask[rows, cols].all(), f"group {a} sees group {b}"


def _assert_no_queries_keep_the_label_embedding_in_the_graph(dn, out, batch_size):
    assert out.num_dn_queries == 0 and out.attn_mask is None
    assert out.content.shape == (batch_size, 0, dn.embed_dim) and out.boxes.shape[1] == 0
    assert all(len(q) == len(t) == 0 for q, t in out.positive_indices)
    # Distributed training needs every parameter in every step's graph.
    (out.content.sum() * 0).backward()
    assert dn.label_enc.weight.grad is not None and not dn.label_enc.weight.grad.any()


@pytest.mark.parametrize("sizes", [[], [0], [0, 0, 0]])
def test_nothing_to_denoise_gives_no_queries(sizes):
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4)
    out = dn(_targets(sizes), num_queries=3)
    _assert_no_queries_keep_the_label_embedding_in_the_graph(dn, out, len(sizes))


def test_dn_disabled_gives_no_queries():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=0)
    out = dn(_targets([3]), num_queries=3)
    _assert_no_queries_keep_the_label_embedding_in_the_graph(dn, out, 1)


def test_more_boxes_than_dn_number_keeps_one_group():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=100)
    out = dn(_targets([500, 20]), num_queries=3, generator=_gen())
    assert out.num_groups == 1
    assert out.num_dn_queries == 1000
    assert out.attn_mask.shape == (1003, 1003)
    assert len(out.positive_indices[0][0]) == 500


@pytest.mark.parametrize("max_targets,groups", [(1, 100), (3, 33), (50, 2), (51, 1), (100, 1)])
def test_group_count_is_dn_number_over_max_targets_without_doubling(max_targets, groups):
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=100)
    assert dn.num_groups(max_targets) == groups
    # Small budgets are divided too (the authors would use 2 * dn_number groups below 50).
    assert ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=10).num_groups(3) == 3


@pytest.mark.parametrize("ratio,num_classes", [(0.5, 1000), (0.5, 4), (0.2, 1000)])
def test_label_noise_rate(ratio, num_classes):
    dn = ContrastiveDenoising(
        num_classes=num_classes, embed_dim=1, dn_number=2000, label_noise_ratio=ratio
    )
    with torch.no_grad():
        dn.label_enc.weight.copy_(torch.arange(num_classes, dtype=torch.float)[:, None])
    targets = _targets([2000, 2000], num_classes=num_classes)
    out = dn(targets, num_queries=1, generator=_gen(123))
    changed = []
    for image, target in enumerate(targets):
        query_idx, target_idx = out.positive_indices[image]
        for q in (query_idx, query_idx + out.group_size // 2):
            noised = out.content[image, q, 0].round().long()
            changed.append(noised != target["labels"][target_idx])
    changed = torch.cat(changed).float()
    assert changed.numel() == 8000
    # Redrawn with p = ratio / 2, uniformly over all classes (so possibly the same class).
    expected = ratio * 0.5 * (1 - 1 / num_classes)
    assert abs(changed.mean().item() - expected) < 0.02


def test_no_label_noise_when_ratio_is_zero():
    dn = ContrastiveDenoising(num_classes=50, embed_dim=1, dn_number=100, label_noise_ratio=0.0)
    with torch.no_grad():
        dn.label_enc.weight.copy_(torch.arange(50, dtype=torch.float)[:, None])
    targets = _targets([40], num_classes=50)
    out = dn(targets, num_queries=1, generator=_gen())
    query_idx, target_idx = out.positive_indices[0]
    assert torch.equal(out.content[0, query_idx, 0].long(), targets[0]["labels"][target_idx])


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_positive_boxes_are_closer_than_negatives(scale):
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=400, box_noise_scale=scale)
    # Small central boxes: the noise never reaches the image border, so nothing is clamped.
    g = _gen(1)
    n = 4
    gt = torch.cat(
        [0.45 + 0.1 * torch.rand(n, 2, generator=g), 0.05 + 0.1 * torch.rand(n, 2, generator=g)], 1
    )
    targets = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": gt}]
    out = dn(targets, num_queries=2, generator=_gen(2))
    query_idx, target_idx = out.positive_indices[0]
    gt_xyxy = box_convert(gt[target_idx], "cxcywh", "xyxy")
    half = (gt[target_idx, 2:] / 2).repeat(1, 2) * scale
    pos = box_convert(out.boxes[0, query_idx], "cxcywh", "xyxy")
    neg = box_convert(out.boxes[0, query_idx + out.group_size // 2], "cxcywh", "xyxy")
    pos_shift = (pos - gt_xyxy).abs() / half
    neg_shift = (neg - gt_xyxy).abs() / half
    eps = 1e-4
    assert (pos_shift < 1 + eps).all(), "positive corners move by less than lambda * half size"
    assert (neg_shift > 1 - eps).all() and (neg_shift < 2 + eps).all()
    # Both ranges are used, roughly uniformly.
    assert 0.4 < pos_shift.mean() < 0.6 and 1.4 < neg_shift.mean() < 1.6
    assert (pos - gt_xyxy).abs().sum() < (neg - gt_xyxy).abs().sum()
    # Shifts go both ways.
    assert ((pos - gt_xyxy) > 0).any() and ((pos - gt_xyxy) < 0).any()


def test_noised_corners_are_clamped_to_the_image():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=200, box_noise_scale=1.0)
    boxes = torch.tensor([[0.05, 0.05, 0.1, 0.1], [0.9, 0.5, 0.2, 0.9], [0.5, 0.5, 1.0, 1.0]])
    targets = [{"labels": torch.zeros(3, dtype=torch.int64), "boxes": boxes}]
    out = dn(targets, num_queries=2, generator=_gen())
    corners = box_convert(out.boxes[0], "cxcywh", "xyxy")
    assert corners.min() >= 0.0 and corners.max() <= 1.0 + 1e-6
    assert (corners < 1e-6).any() and (corners > 1 - 1e-6).any(), "clamping never kicked in"


def test_same_generator_seed_gives_the_same_queries():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=10)
    targets = _targets([3, 2])
    a = dn(targets, num_queries=2, generator=_gen(7))
    b = dn(targets, num_queries=2, generator=_gen(7))
    c = dn(targets, num_queries=2, generator=_gen(8))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.content, b.content)
    assert not torch.equal(a.boxes, c.boxes)


def test_gradient_reaches_the_label_embedding():
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, dn_number=10)
    out = dn(_targets([3, 2]), num_queries=2, generator=_gen())
    out.content.sum().backward()
    assert dn.label_enc.weight.grad is not None and dn.label_enc.weight.grad.abs().sum() > 0
