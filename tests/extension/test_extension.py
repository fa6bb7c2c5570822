"""dino_d2 extended from outside the package, as a researcher would: a new loss term, a new
matching cost term, a new head and a new backbone, each a few lines of code plus config lines,
with no edit to dino_d2's classes (docs/EXTENDING.md shows the same code)."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling import Backbone
from detectron2.structures import Boxes, Instances

from dino_d2.modeling import LOSSES, MATCHING_COSTS


# A loss term: the matched boxes' area pulled towards the target's.
@LOSSES.register()
def loss_box_area(matched, weight_small=1.0):
    predicted = matched.matched_boxes[:, 2:].prod(-1)
    target = matched.target_boxes[:, 2:].prod(-1)
    return (predicted - target).abs().sum() / matched.num_boxes * weight_small


# A matching cost term: distance between the box centres.
@MATCHING_COSTS.register()
def cost_center(logits, boxes, labels, gt_boxes):
    return torch.cdist(boxes[:, :2].float(), gt_boxes[:, :2].float())


# A head reading the decoder's hidden states, and the loss that trains it (decoder sets only).
class ObjectnessHead(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 1)

    def forward(self, outputs):
        return {"objectness": self.linear(outputs.hidden_states).squeeze(-1)}


@LOSSES.register()
def loss_objectness(matched):
    logits = matched.queries.extra("objectness")
    if logits is None:  # the encoder proposals have no hidden states
        return None
    target = torch.zeros_like(logits)
    target[matched.batch_idx, matched.query_idx] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / matched.num_boxes


# A backbone: any Detectron2 Backbone that declares its outputs.
class TinyBackbone(Backbone):
    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        layers, in_channels = [], 3
        for width in widths:
            layers.append(nn.Conv2d(in_channels, width, 3, stride=2 if layers else 8, padding=1))
            in_channels = width
        self.stages = nn.ModuleList(layers)
        self._out_features = ["res3", "res4", "res5"]
        self._out_feature_channels = dict(zip(self._out_features, widths))
        self._out_feature_strides = {"res3": 8, "res4": 16, "res5": 32}

    def forward(self, x):
        outputs = {}
        for name, stage in zip(self._out_features, self.stages):
            x = F.relu(stage(x))
            outputs[name] = x
        return outputs


def _batch(num_images=2):
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(num_images):
        instances = Instances((64, 96))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 40.0]]))
        instances.gt_classes = torch.tensor([1, i + 2])
        batch.append({"image": torch.rand(3, 64, 96, generator=g) * 255, "instances": instances})
    return batch


def _train_step(model):
    torch.manual_seed(0)
    losses = model.train()(_batch())
    sum(losses.values()).backward()
    return losses


def test_a_loss_added_through_the_config(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.criterion.losses.loss_box_area = 0.5
    model = instantiate(cfg.model)
    losses = _train_step(model)
    for suffix in ("", "_enc", "_dn"):
        assert "loss_box_area" + suffix in losses
    assert model.criterion.weight_dict["loss_box_area"] == 0.5
    # It receives gradient: the last decoder box head is trained by it alone too.
    model.zero_grad()
    model.train()(_batch())["loss_box_area"].backward()
    head = model.transformer.decoder.bbox_embed[-1].layers[-1].weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_a_matching_cost_added_through_the_config(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.criterion.matcher.costs = {"cost_center": 1.0}
    matcher = instantiate(cfg.model).criterion.matcher
    boxes = torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.2, 0.3, 0.5, 0.5], [0.6, 0.6, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 80)
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.6, 0.5, 0.9, 0.9]] * 2)}]
    targets[0]["boxes"][1, :2] = torch.tensor([0.25, 0.3])
    query_idx, target_idx = matcher(logits, boxes, targets)[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 1}


def test_a_head_added_through_the_config(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.heads = L(OrderedDict)(
        objectness=L(ObjectnessHead)(embed_dim="${...transformer.embed_dim}")
    )
    cfg.model.criterion.losses.loss_objectness = 1.0
    model = instantiate(cfg.model)
    losses = _train_step(model)
    assert {"loss_objectness", "loss_objectness_dn"} <= set(losses)
    assert "loss_objectness_enc" not in losses
    assert model.heads["objectness"].linear.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": _batch(1)[0]["image"]}])
    instances = result["instances"]
    assert instances.objectness.shape == instances.scores.shape == (cfg.model.num_select,)


def test_a_backbone_added_through_the_config(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.backbone.bottom_up = L(TinyBackbone)(widths=(16, 32, 64))
    cfg.model.backbone.in_features = ["res3", "res4", "res5"]
    model = instantiate(cfg.model)
    _train_step(model)
    assert model.backbone.bottom_up.stages[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": _batch(1)[0]["image"]}])
    assert len(result["instances"]) == cfg.model.num_select


def test_mistakes_are_clear_errors(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.criterion.losses.loss_nonexistent = 1.0
    with pytest.raises(ValueError, match=r"unknown loss \['loss_nonexistent'\].*LOSSES"):
        instantiate(cfg.model)
    cfg = tiny_dino_config()
    cfg.model.heads = {"objectness": L(ObjectnessHead)(embed_dim=64)}
    with pytest.raises(TypeError, match=r"write model.heads = L\(OrderedDict\)\(objectness="):
        instantiate(cfg.model)
