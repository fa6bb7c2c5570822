"""DINO on awkward training data: degenerate boxes, crowded images, tiny and extreme images."""

import logging

import pytest
import torch

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances


@pytest.fixture(name="tiny_model")
def tiny_model_fixture(tiny_dino_config):
    def build():
        torch.manual_seed(0)
        return instantiate(tiny_dino_config().model)

    return build


def _sample(h, w, boxes, classes, seed=0):
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255
    instances = Instances((h, w))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": image, "instances": instances, "file_name": f"image_{seed}.png"}


def _losses(model, batch):
    torch.manual_seed(1)  # the same denoising noise for every call
    return model(batch)


def test_degenerate_boxes_are_dropped_and_logged_once(tiny_model, caplog):
    model = tiny_model().train()
    nan = float("nan")
    good = [[4, 4, 30, 20], [10, 8, 70, 40]]  # the second leaves the 64x64 image: clipped
    bad = [[5, 5, 5, 20], [30, 30, 20, 40], [nan, 1, 10, 10], [70, 70, 90, 90]]
    batch = [_sample(64, 64, good + bad, [1, 2, 3, 4, 5, 6])]
    with caplog.at_level(logging.WARNING):
        losses = _losses(model, batch)
        again = _losses(model, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.num_dropped_boxes == 8
    warnings = [r.getMessage() for r in caplog.records if "ground-truth box" in r.getMessage()]
    assert len(warnings) == 1 and "Dropped 4" in warnings[0] and "image_0.png" in warnings[0]
    # Exactly as if the bad boxes were not there and the leaving box ended at the border.
    clean = _losses(model, [_sample(64, 64, [[4, 4, 30, 20], [10, 8, 64, 40]], [1, 2])])
    for name, value in losses.items():
        assert torch.allclose(value, clean[name]) and torch.equal(value, again[name]), name


def test_only_degenerate_boxes_train_like_an_empty_image(tiny_model):
    model = tiny_model().train()
    losses = _losses(model, [_sample(64, 64, [[5, 5, 5, 5]], [0])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_more_objects_than_dn_number_keeps_one_group_and_trains(tiny_model):
    model = tiny_model().train()
    assert model.denoising.dn_number < 500
    assert model.denoising.num_groups(500) == 1
    corners = torch.rand(500, 2, generator=torch.Generator().manual_seed(0)) * 56
    boxes = torch.cat([corners, corners + 8], dim=1).tolist()
    losses = _losses(model, [_sample(64, 64, boxes, [i % 80 for i in range(500)])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("height, width", [(16, 16), (32, 2000), (2000, 32)])
def test_tiny_and_extreme_images_train_and_infer(tiny_model, height, width):
    model = tiny_model().train()
    box = [1, 1, min(width, 12) - 1, min(height, 12) - 1]
    losses = _losses(model, [_sample(height, width, [box], [3])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": _sample(height, width, [], [])["image"]}])
    boxes = output["instances"].pred_boxes.tensor
    assert len(boxes) == model.num_select and torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
