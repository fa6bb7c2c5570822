"""Mask-enhanced anchors: boxes of predicted masks, relative to each image's valid region."""

import pytest
import torch

from dino_d2.projects.mask_dino.mask_anchors import mask_anchors, mask_boxes


def test_boxes_of_masks():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 0, 9] = True
    assert mask_boxes(masks, "mask2box").tolist() == [[3, 2, 6, 4], [9, 0, 9, 0], [0, 0, 0, 0]]
    assert mask_boxes(masks, "bitmask")[0].tolist() == [3, 2, 7, 5]
    with pytest.raises(ValueError, match="mask_box_init.*'box'"):
        mask_boxes(masks, "box")


def test_anchors_are_relative_to_the_valid_region_and_empty_masks_keep_theirs():
    logits = torch.full((2, 2, 8, 8), -1.0)
    logits[:, 0, 0:4, 0:2] = 1.0  # a 2 x 4 mask in the top-left corner
    anchors = torch.full((2, 2, 4), 0.3)
    # Image 0 fills the map; image 1 only its left half (valid width 4 of 8).
    ratios = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    out = mask_anchors(logits, anchors, ratios, "bitmask").sigmoid()
    torch.testing.assert_close(out[0, 0], torch.tensor([1 / 8, 2 / 8, 2 / 8, 4 / 8]))
    torch.testing.assert_close(out[1, 0], torch.tensor([1 / 4, 2 / 8, 2 / 4, 4 / 8]))
    torch.testing.assert_close(out[:, 1], anchors[:, 1].sigmoid())
    assert mask_anchors(logits, anchors, ratios, None) is anchors
