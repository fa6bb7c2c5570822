"""The contracts extensions build on, used from outside the package (docs/EXTENDING.md): target
fields beyond boxes, matching costs that ask for extra outputs and target fields by parameter
name, a head on the memory and the backbone's features, proposal outputs, exported extras."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances, PolygonMasks

from dino_d2.export.graph import InferenceGraph
from dino_d2.modeling import LOSSES, MATCHING_COSTS, HeadOutputs


# A cost asking for an extra head's output and a target field by parameter name.
@MATCHING_COSTS.register()
def cost_weight_gap(logits, boxes, labels, gt_boxes, weight_score, gt_weight):
    return (weight_score[:, None] - gt_weight[None, :]).abs()


# A head on the memory and the backbone's res2 map, predicting for the proposals too.
class PixelHead(nn.Module):
    def __init__(self, embed_dim, res2_channels):
        super().__init__()
        self.query = nn.Linear(embed_dim, 4)
        self.pixels = nn.Conv2d(res2_channels + embed_dim, 4, 1)

    def forward(self, outputs):
        h, w = outputs.levels.shapes[0]
        finest = outputs.memory[:, : h * w].transpose(1, 2).unflatten(-1, (h, w))
        res2 = outputs.features["res2"]
        finest = nn.functional.interpolate(finest, size=res2.shape[-2:])
        pixels = self.pixels(torch.cat([res2, finest], 1))
        maps = torch.einsum("lbqc,bchw->lbqhw", self.query(outputs.hidden_states), pixels)
        proposals = torch.einsum("bqc,bchw->bqhw", self.query(outputs.enc_states), pixels)
        return HeadOutputs(queries={"pixel_maps": maps}, proposals={"pixel_maps": proposals})


@LOSSES.register()
def loss_pixel_maps(matched):
    maps = matched.queries.extra("pixel_maps")[matched.batch_idx, matched.query_idx]
    regions = matched.target_field("gt_masks")[:, None].float()
    regions = nn.functional.interpolate(regions, size=maps.shape[-2:])[:, 0]
    return nn.functional.binary_cross_entropy_with_logits(maps, regions, reduction="sum")


def _with_res2(cfg):
    cfg.model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
    cfg.model.backbone.in_features = ["res3", "res4", "res5"]
    return cfg


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in ((64, 96), (48, 64)):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 40.0], [0.0, 0.0, 0.0, 5.0]]))
        instances.gt_classes = torch.tensor([1, 2])
        instances.gt_masks = PolygonMasks([[[4, 6, 40, 6, 40, 40, 4, 40]], [[0, 0, 1, 0, 1, 5]]])
        instances.gt_weight = torch.tensor([0.25, 0.5])
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": instances})
    return batch


def test_targets_keep_every_field(tiny_dino_config):
    model = instantiate(tiny_dino_config().model)
    batch = _batch()
    targets = model.prepare_targets(batch, [(64, 96), (48, 64)], (64, 96))
    # The empty second box is dropped from every field alike.
    assert [len(t["labels"]) for t in targets] == [1, 1]
    assert targets[0]["gt_weight"].tolist() == [0.25]
    masks = targets[1]["gt_masks"]
    assert masks.shape == (1, 64, 96) and masks.dtype == torch.uint8
    assert masks[0, 10, 10] == 1 and masks[0, :, 64:].sum() == 0 and masks[0, 48:].sum() == 0


def test_a_cost_asks_for_extras_and_target_fields_by_name(tiny_dino_config):
    cfg = tiny_dino_config()
    cfg.model.criterion.matcher.costs = {"cost_weight_gap": 1.0}
    matcher = instantiate(cfg.model).criterion.matcher
    assert matcher.requested_inputs == ["gt_weight", "weight_score"]
    targets = [
        {
            "labels": torch.tensor([0, 0]),
            "boxes": torch.rand(2, 4),
            "gt_weight": torch.tensor([0.9, 0.1]),
        }
    ]
    extras = {"weight_score": torch.tensor([[0.0, 0.5, 1.0]])}
    query_idx, target_idx = matcher(torch.zeros(1, 3, 80), torch.rand(1, 3, 4), targets, extras)[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 0}
    with pytest.raises(ValueError, match=r"cost_weight_gap.*\['weight_score'\]"):
        matcher(torch.zeros(1, 3, 80), torch.rand(1, 3, 4), targets)


def test_a_head_on_the_memory_and_res2_with_proposal_outputs(tiny_dino_config):
    cfg = _with_res2(tiny_dino_config())
    cfg.model.heads = L(OrderedDict)(pixels=L(PixelHead)(embed_dim=64, res2_channels=64))
    cfg.model.criterion.losses.loss_pixel_maps = 1.0
    model = instantiate(cfg.model).train()
    torch.manual_seed(0)
    losses = model(_batch())
    assert {"loss_pixel_maps", "loss_pixel_maps_enc", "loss_pixel_maps_dn"} <= set(losses)
    sum(losses.values()).backward()
    assert model.heads["pixels"].pixels.weight.grad.abs().sum() > 0
    model.eval()
    graph = InferenceGraph(model)
    images = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    sizes = torch.tensor([[64, 96], [48, 64]])
    with torch.no_grad():
        names = graph.output_names(images, sizes)
        outputs = graph(images, sizes)
    assert names[-1] == "pixel_maps"
    assert outputs[-1].shape == (2, cfg.model.num_select, 16, 24)
