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


class _ScoreHead(nn.Module):
    """An extra head whose linear runs in bfloat16 under autocast."""

    def __init__(self, embed_dim):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 1)

    def forward(self, outputs):
        return {"mixed_precision_score": self.linear(outputs.hidden_states).squeeze(-1)}


def test_extra_heads_outputs_reach_the_losses_in_float32_under_autocast(tiny_dino_config):
    # A loss term reading an extra head's bfloat16 output gets it widened, as the class logits
    # and boxes are (Mask DINO's mask losses gave NaN from the second bfloat16 step without it).
    from collections import OrderedDict

    from detectron2.config import LazyCall as L

    from dino_d2.modeling import LOSSES

    seen = []

    def loss_mixed_precision_score(matched):
        score = matched.queries.extra("mixed_precision_score")
        if score is None:
            return None
        seen.append(score.dtype)
        return score[matched.batch_idx, matched.query_idx].sigmoid().sum() / matched.num_boxes

    if "loss_mixed_precision_score" not in LOSSES:
        LOSSES.register(loss_mixed_precision_score)
    cfg = tiny_dino_config(decoder_layers=2)
    cfg.model.heads = L(OrderedDict)(score=L(_ScoreHead)(embed_dim="${...transformer.embed_dim}"))
    cfg.model.criterion.losses["loss_mixed_precision_score"] = 1.0
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    instances = Instances((64, 96))
    instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0]]))
    instances.gt_classes = torch.tensor([0])
    batch = [{"image": torch.randint(256, (3, 64, 96)).float(), "instances": instances}]
    with torch.autocast("cpu", torch.bfloat16):
        losses = model(batch)
    assert seen and set(seen) == {torch.float32}
    assert losses["loss_mixed_precision_score"].dtype == torch.float32
