"""DINO under bfloat16 autocast: the box refinement, the matching and the losses stay float32
(dino_d2.layers.precision), while the matrix products run in bfloat16."""

import math

import torch
from torch import nn

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances

from dino_d2.layers.precision import in_float32

__all__ = []


def test_in_float32_widens_only_under_autocast():
    layer = nn.Linear(4, 2)
    x = torch.randn(3, 4, requires_grad=True)
    assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        out = in_float32(layer, x.bfloat16())
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad.dtype == torch.float32
    assert in_float32(layer, x).dtype == torch.float32  # no autocast: the plain call


def test_training_losses_and_refined_boxes_are_float32_under_autocast(tiny_dino_config):
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config(decoder_layers=2).model).train()
    batch = []
    for _ in range(2):
        instances = Instances((64, 96))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 90.0, 30.0]]))
        instances.gt_classes = torch.tensor([0, 1])
        image = torch.randint(256, (3, 64, 96)).float()
        batch.append({"image": image, "instances": instances})
    seen = {}

    def record(module, args, output):
        seen["boxes"] = output.pred_boxes.dtype
        seen["logits"] = output.pred_logits.dtype

    model.transformer.decoder.register_forward_hook(record)
    with torch.autocast("cpu", torch.bfloat16):
        losses = model(batch)
    # The class head ran in bfloat16; the boxes were refined in float32.
    assert seen == {"boxes": torch.float32, "logits": torch.bfloat16}
    assert {loss.dtype for loss in losses.values()} == {torch.float32}
    total = sum(losses.values())
    assert math.isfinite(total.item())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
