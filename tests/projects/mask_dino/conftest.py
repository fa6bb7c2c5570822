from collections import OrderedDict

import pytest
import torch

from detectron2.config import LazyCall as L
from detectron2.structures import BitMasks, Boxes, Instances

from dino_d2.projects.mask_dino import MaskDINO, MaskHead, MaskPixelDecoder


def tiny_mask_dino_config(tiny_dino_config, **kwargs):
    """The tiny DINO of tests/conftest.py made a Mask DINO through config edits (res2 of the
    ResNet-18 has 64 channels; masks sampled at 64 points)."""
    cfg = tiny_dino_config(**kwargs)
    model = cfg.model
    model._target_ = MaskDINO
    model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
    model.backbone.in_features = ["res3", "res4", "res5"]
    model.backbone.bottom_up.freeze_at = 0
    model.heads = L(OrderedDict)(
        masks=L(MaskHead)(
            pixel_decoder=L(MaskPixelDecoder)(
                in_channels=64, embed_dim="${....transformer.embed_dim}", mask_dim=32, num_groups=8
            ),
            embed_dim="${...transformer.embed_dim}",
        )
    )
    model.criterion.matcher.costs = dict(
        cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0
    )
    model.criterion.matcher.cost_options = dict(cost_mask=dict(num_points=64))
    points = dict(num_points=64)
    model.criterion.losses = dict(
        loss_class=4.0, loss_bbox=5.0, loss_giou=2.0, loss_mask=5.0, loss_dice=5.0
    )
    model.criterion.loss_options = dict(loss_mask=points, loss_dice=points)
    return cfg


@pytest.fixture(name="tiny_mask_dino_config")
def tiny_mask_dino_config_fixture(tiny_dino_config):
    return lambda **kwargs: tiny_mask_dino_config(tiny_dino_config, **kwargs)


def rectangles_batch(sizes=((64, 96), (80, 72)), seed=0):
    """Images with two bright rectangles each, their boxes, classes and BitMasks."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, (h, w) in enumerate(sizes):
        image = torch.rand(3, h, w, generator=g) * 60
        boxes = torch.tensor([[4.0, 6.0, 36.0, 40.0], [40.0, 30.0, 64.0, 60.0]])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = True
            image[:, y0:y1, x0:x1] += 150 + 40 * j
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([1, i + 2])
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": instances})
    return batch


@pytest.fixture(name="rectangles_batch")
def rectangles_batch_fixture():
    return rectangles_batch
