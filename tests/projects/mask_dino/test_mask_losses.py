"""The mask loss terms, the mask matching cost and the pixel decoder on hand-checkable cases."""

import pytest
import torch

from detectron2.config import instantiate

from dino_d2.modeling import HungarianMatcher, MatchedQueries, QuerySet
from dino_d2.projects.mask_dino import MaskPixelDecoder, loss_dice, loss_mask
from dino_d2.projects.mask_dino.losses import dice_loss


class _Outputs:
    def __init__(self, masks):
        self.extras = {"mask_logits": masks[None]}
        self.enc_extras = {}


def _matched(logits, gt_masks):
    """One image, Q queries with (Q, H, W) mask logits; query j matched to target j."""
    q = logits.shape[0]
    queries = QuerySet(
        "", torch.zeros(1, q, 3), torch.rand(1, q, 4), 0, slice(0, q), _Outputs(logits[None])
    )
    targets = [
        {
            "labels": torch.zeros(len(gt_masks), dtype=torch.long),
            "boxes": torch.rand(len(gt_masks), 4),
            "gt_masks": gt_masks,
        }
    ]
    index = torch.arange(len(gt_masks))
    return MatchedQueries(queries, targets, [(index, index)], float(len(gt_masks)))


def test_dice_of_identical_masks_is_zero():
    labels = (torch.rand(3, 100) > 0.5).float()
    logits = (labels * 2 - 1) * 1e4
    assert torch.allclose(dice_loss(logits, labels), torch.zeros(3), atol=1e-6)
    assert (dice_loss(-logits, labels) > 0.9).all()


def test_mask_losses_pull_logits_towards_the_target():
    gt = torch.zeros(1, 16, 16, dtype=torch.uint8)
    gt[0, 4:12, 4:12] = 1
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    matched = _matched(logits, gt)
    bce = loss_mask(matched, num_points=200)
    dice = loss_dice(matched, num_points=200)
    # Both terms read the same points of the set.
    assert len(matched.cache) == 1
    (bce + dice).backward()
    inside, outside = logits.grad[0, 1:3, 1:3], logits.grad[0, 0]
    assert (inside < 0).all() and (outside > 0).all()


def test_matching_picks_the_query_whose_mask_overlaps():
    gt = torch.zeros(2, 32, 32, dtype=torch.uint8)
    gt[0, :16, :16] = 1
    gt[1, 16:, 16:] = 1
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 0, 4:, 4:] = 10.0  # query 0 covers target 1
    logits[0, 2, :4, :4] = 10.0  # query 2 covers target 0
    targets = [
        {
            "labels": torch.zeros(2, dtype=torch.long),
            "boxes": torch.full((2, 4), 0.5),
            "gt_masks": gt,
        }
    ]
    matcher = HungarianMatcher(
        costs={"cost_mask": 1.0}, cost_options={"cost_mask": {"num_points": 256}}
    )
    assert matcher.requested_inputs == ["gt_masks", "mask_logits"]
    query_idx, target_idx = matcher(
        torch.zeros(1, 3, 2), torch.full((1, 3, 4), 0.5), targets, {"mask_logits": logits}
    )[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 0}


def test_pixel_decoder_fuses_memory_and_res2(tiny_dino_config):
    cfg = tiny_dino_config()
    model = instantiate(cfg.model).eval()
    decoder = MaskPixelDecoder(in_channels=64, embed_dim=64, mask_dim=16, num_groups=8)
    images = torch.rand(2, 3, 64, 96) * 255
    sizes = torch.tensor([[64, 96], [40, 50]])
    with torch.no_grad():
        features, masks = model.extract_features(model.normalize(images, sizes), sizes, False)
        outputs = model.transformer(features, masks)
        mask_features = decoder(outputs.memory, outputs.levels, {"res2": torch.rand(2, 64, 16, 24)})
    assert mask_features.shape == (2, 16, 16, 24)
    with pytest.raises(KeyError, match="res2.*out_features"):
        decoder(outputs.memory, outputs.levels, {})
