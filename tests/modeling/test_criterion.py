import math

import pytest
import torch
import torch.distributed as dist

from dino_d2.modeling.criterion import DINOCriterion
from dino_d2.modeling.denoising import ContrastiveDenoising
from dino_d2.modeling.matcher import HungarianMatcher
from dino_d2.modeling.transformer import DINOTransformerOutput, MultiScaleLevels

K = 4  # classes
Q = 6  # matching queries
L = 3  # decoder layers


def _targets(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        boxes = torch.cat(
            [0.3 + 0.4 * torch.rand(n, 2, generator=g), 0.1 + 0.2 * torch.rand(n, 2, generator=g)],
            1,
        )
        targets.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": boxes})
    return targets


def _dn(targets, dn_number=6, seed=0):
    module = ContrastiveDenoising(num_classes=K, embed_dim=8, dn_number=dn_number)
    return module(targets, Q, generator=torch.Generator().manual_seed(seed))


def _outputs(batch, num_dn=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(L, batch, num_dn + Q, K, generator=g).requires_grad_(),
        "pred_boxes": (
            0.2 + 0.6 * torch.rand(L, batch, num_dn + Q, 4, generator=g)
        ).requires_grad_(),
        "enc_logits": torch.randn(batch, Q, K, generator=g).requires_grad_(),
        "enc_boxes": (0.2 + 0.6 * torch.rand(batch, Q, 4, generator=g)).requires_grad_(),
    }


def _transformer_output(outputs):
    """A DINOTransformerOutput around the predictions these tests make up (the other fields,
    which the default losses do not read, are placeholders of the right shapes)."""
    layers, batch, total, _ = outputs["pred_logits"].shape
    mask = torch.zeros(batch, 2, 3, dtype=torch.bool)
    return DINOTransformerOutput(
        hidden_states=torch.zeros(layers, batch, total, 8),
        reference_boxes=torch.full((layers, batch, total, 4), 0.5),
        memory=torch.zeros(batch, 6, 8),
        levels=MultiScaleLevels.from_masks([mask]),
        selected_indices=torch.zeros(batch, Q, dtype=torch.int64),
        num_dn=total - Q,
        **outputs,
    )


class _Criterion:
    """DINOCriterion called with the made-up predictions of these tests."""

    def __init__(self, num_decoder_layers=L, **kwargs):
        self.module = DINOCriterion(
            num_classes=K,
            matcher=HungarianMatcher(),
            num_decoder_layers=num_decoder_layers,
            **kwargs,
        )
        self.weight_dict = self.module.weight_dict

    def __call__(self, outputs, targets, dn):
        return self.module(_transformer_output(outputs), targets, dn)


def _criterion(**weights):
    losses = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    losses.update(weights)
    return _Criterion(losses=losses)


def _expected_keys(num_layers):
    suffixes = [f"_{i}" for i in range(num_layers - 1)] + ["", "_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(num_layers - 1)]
    return {f"loss_{name}{s}" for name in ("class", "bbox", "giou") for s in suffixes}


def _focal_sum(logits, onehot, alpha=0.25, gamma=2.0):
    p = logits.sigmoid()
    ce = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def test_loss_keys_are_the_same_with_and_without_denoising():
    targets = _targets([2, 3])
    dn = _dn(targets)
    with_dn = _criterion()(_outputs(2, dn.num_dn_queries), targets, dn)
    without_dn = _criterion()(_outputs(2), targets, None)
    assert set(with_dn) == set(without_dn) == _expected_keys(L)
    assert set(_criterion().weight_dict) == _expected_keys(L)
    single = _Criterion(num_decoder_layers=1)
    assert set(single.weight_dict) == _expected_keys(1)
    assert all(v.dim() == 0 for v in with_dn.values())


def _perfect_outputs(targets, dn, seed=0):
    """Random outputs made exact where queries are matched: query j of each image for box j."""
    outputs = {
        k: v.detach().clone() for k, v in _outputs(len(targets), dn.num_dn_queries, seed).items()
    }
    for image, target in enumerate(targets):
        n = len(target["labels"])
        rows = torch.arange(n)
        for logits, boxes, offset in (
            (outputs["pred_logits"][:, image], outputs["pred_boxes"][:, image], dn.num_dn_queries),
            (outputs["enc_logits"][None, image], outputs["enc_boxes"][None, image], 0),
        ):
            logits[:, offset:] = -12.0
            logits[:, offset + rows, target["labels"]] = 12.0
            boxes[:, offset + rows] = target["boxes"]
        query_idx, target_idx = dn.positive_indices[image]
        outputs["pred_logits"][:, image, : dn.num_dn_queries] = -12.0
        outputs["pred_logits"][:, image, query_idx, target["labels"][target_idx]] = 12.0
        outputs["pred_boxes"][:, image, query_idx] = target["boxes"][target_idx]
    return outputs


def test_perfect_predictions_give_near_zero_losses():
    targets = _targets([2, 3])
    dn = _dn(targets)
    perfect = _criterion()(_perfect_outputs(targets, dn), targets, dn)
    random = _criterion()(_outputs(2, dn.num_dn_queries), targets, dn)
    for name, value in perfect.items():
        if "bbox" in name or "giou" in name:
            assert value.item() < 1e-5, name
            assert random[name].item() > 0.1, name
        else:
            assert value.item() < 1e-4, name
            assert value.item() < random[name].item(), name


def test_class_loss_is_normalized_like_the_authors():
    targets = _targets([2, 0, 3])
    dn = _dn(targets)
    outputs = _outputs(3, dn.num_dn_queries)
    criterion = _criterion(loss_class=3.0)
    losses = criterion(outputs, targets, dn)
    num_boxes = 5
    # Last layer, matching part: the focal sum over all queries and classes / num_boxes.
    logits = outputs["pred_logits"][-1, :, dn.num_dn_queries :].detach()
    onehot = torch.zeros_like(logits)
    indices = HungarianMatcher()(logits, outputs["pred_boxes"][-1, :, dn.num_dn_queries :], targets)
    for image, (query_idx, target_idx) in enumerate(indices):
        onehot[image, query_idx, targets[image]["labels"][target_idx]] = 1
    expected = 3.0 * _focal_sum(logits, onehot) / num_boxes
    assert losses["loss_class"].item() == pytest.approx(expected.item(), rel=1e-5)
    # DN part of layer 0: positives are their box's class, the rest background; / (boxes * groups).
    logits = outputs["pred_logits"][0, :, : dn.num_dn_queries].detach()
    onehot = torch.zeros_like(logits)
    for image, (query_idx, target_idx) in enumerate(dn.positive_indices):
        onehot[image, query_idx, targets[image]["labels"][target_idx]] = 1
    expected = 3.0 * _focal_sum(logits, onehot) / (num_boxes * dn.num_groups)
    assert losses["loss_class_dn_0"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_box_losses_are_weighted_and_normalized():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    targets = [{"labels": torch.tensor([1]), "boxes": gt}]
    outputs = {k: v.detach() for k, v in _outputs(1).items()}
    outputs["pred_boxes"][:] = torch.tensor([0.9, 0.9, 0.1, 0.1])
    outputs["pred_boxes"][:, 0, 2] = torch.tensor([0.55, 0.5, 0.2, 0.2])  # only plausible match
    losses = _criterion(loss_bbox=7.0, loss_giou=3.0)(outputs, targets, None)
    assert losses["loss_bbox"].item() == pytest.approx(7.0 * 0.05, rel=1e-5)
    inter = 0.15 * 0.2
    union = 2 * 0.04 - inter
    hull = 0.25 * 0.2
    giou = inter / union - (hull - union) / hull
    assert losses["loss_giou"].item() == pytest.approx(3.0 * (1 - giou), rel=1e-5)


def test_dn_box_losses_ignore_negatives_and_class_loss_penalizes_them():
    targets = _targets([2, 3])
    dn = _dn(targets)
    outputs = _outputs(2, dn.num_dn_queries)
    base = _criterion()(outputs, targets, dn)
    changed = {k: v.detach().clone() for k, v in outputs.items()}
    for image, (query_idx, target_idx) in enumerate(dn.positive_indices):
        negatives = query_idx + dn.group_size // 2
        changed["pred_boxes"][:, image, negatives] = targets[image]["boxes"][target_idx] * 0.1
        changed["pred_logits"][:, image, negatives, targets[image]["labels"][target_idx]] = 10.0
    moved = _criterion()(changed, targets, dn)
    for suffix in ["_dn"] + [f"_dn_{i}" for i in range(L - 1)]:
        assert moved["loss_bbox" + suffix] == base["loss_bbox" + suffix]
        assert moved["loss_giou" + suffix] == base["loss_giou" + suffix]
        assert moved["loss_class" + suffix] > base["loss_class" + suffix] + 1.0


def test_all_losses_finite_when_one_image_has_no_targets():
    targets = _targets([3, 0])
    dn = _dn(targets)
    outputs = _outputs(2, dn.num_dn_queries)
    losses = _criterion()(outputs, targets, dn)
    assert set(losses) == _expected_keys(L)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for tensor in outputs.values():
        assert torch.isfinite(tensor.grad).all()


def test_empty_batch_gives_zero_dn_losses_with_the_usual_keys():
    targets = _targets([0, 0])
    dn = _dn(targets)
    assert dn.num_dn_queries == 0
    outputs = _outputs(2)
    losses = _criterion()(outputs, targets, dn)
    assert set(losses) == _expected_keys(L) == set(_criterion()(outputs, targets, None))
    assert all(torch.isfinite(v) for v in losses.values())
    for name, value in losses.items():
        if "_dn" in name or "bbox" in name or "giou" in name:
            assert value.item() == 0.0, name
    assert losses["loss_class"].item() > 0  # every query is pushed to background
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_gradient_flows_to_every_prediction():
    targets = _targets([2, 3])
    dn = _dn(targets)
    outputs = _outputs(2, dn.num_dn_queries)
    sum(_criterion()(outputs, targets, dn).values()).backward()
    num_dn = dn.num_dn_queries
    for layer in range(L):
        assert outputs["pred_logits"].grad[layer, :, :num_dn].abs().sum() > 0
        assert outputs["pred_logits"].grad[layer, :, num_dn:].abs().sum() > 0
        assert outputs["pred_boxes"].grad[layer, :, num_dn:].abs().sum() > 0
        for image, (query_idx, _) in enumerate(dn.positive_indices):
            box_grad = outputs["pred_boxes"].grad[layer, image]
            assert (box_grad[query_idx].abs().sum(-1) > 0).all()
            negatives = query_idx + dn.group_size // 2
            assert (box_grad[negatives] == 0).all()
    assert outputs["enc_logits"].grad.abs().sum() > 0
    assert outputs["enc_boxes"].grad.abs().sum() > 0


def test_rejects_outputs_that_do_not_fit():
    targets = _targets([2])
    dn = _dn(targets)
    with pytest.raises(ValueError):
        _Criterion(num_decoder_layers=L + 1)(_outputs(1, dn.num_dn_queries), targets, dn)
    with pytest.raises(ValueError):
        _criterion()(_outputs(1), targets, dn)


def test_num_boxes_is_averaged_over_workers(tmp_path):
    targets = _targets([2, 3])
    outputs = _outputs(2)
    local = _criterion()(outputs, targets, None)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        distributed = _criterion()(outputs, targets, None)
    finally:
        dist.destroy_process_group()
    for name, value in local.items():
        assert torch.allclose(distributed[name], value), name


def test_num_boxes_is_clamped_to_one():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    outputs = {k: v.detach() for k, v in _outputs(1).items()}
    losses = _criterion()(outputs, targets, None)
    expected = _focal_sum(outputs["pred_logits"][-1], torch.zeros(1, Q, K))
    assert losses["loss_class"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(losses["loss_class_enc"].item())


def test_unknown_loss_or_stray_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown loss \['loss_typo'\].*loss_bbox"):
        _Criterion(losses={"loss_class": 1.0, "loss_typo": 1.0})
    with pytest.raises(ValueError, match="loss_options for \\['loss_giou'\\]"):
        _Criterion(losses={"loss_class": 1.0}, loss_options={"loss_giou": {}})


def test_loss_options_reach_the_term():
    targets = _targets([2, 3])
    outputs = {k: v.detach() for k, v in _outputs(2).items()}
    default = _Criterion()(outputs, targets, None)
    same = _Criterion(loss_options={"loss_class": {"alpha": 0.25, "gamma": 2.0}})(
        outputs, targets, None
    )
    other = _Criterion(loss_options={"loss_class": {"gamma": 0.0}})(outputs, targets, None)
    assert same["loss_class"] == default["loss_class"]
    assert other["loss_class"] != default["loss_class"]
    assert other["loss_bbox"] == default["loss_bbox"]
