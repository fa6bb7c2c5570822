import torch
from torch import nn

from dino_d2.engine import get_optimizer_params


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.convs = nn.Conv2d(4, 4, 1)
        head = nn.Linear(4, 2)
        self.heads = nn.ModuleList([head, head])
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _group_of_each_param(groups):
    by_param = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in by_param, "a parameter is in two groups"
            by_param[id(param)] = group
    return by_param


def test_backbone_lr_norm_decay_shared_and_frozen():
    model = _Model()
    groups = get_optimizer_params(model, base_lr=1e-4, weight_decay=1e-4, weight_decay_norm=0.0)
    by_param = _group_of_each_param(groups)
    assert len(by_param) == 2 + 2 + 2 + 2 + 2
    assert by_param[id(model.backbone.bottom_up[0].weight)]["lr"] == 1e-4 * 0.1
    assert by_param[id(model.backbone.convs.weight)]["lr"] == 1e-4
    assert by_param[id(model.backbone.bottom_up[1].weight)]["weight_decay"] == 0.0
    assert by_param[id(model.norm.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.heads[0].weight)]["weight_decay"] == 1e-4
    assert id(model.frozen.weight) not in by_param
    torch.optim.AdamW(groups)


def test_one_group_per_distinct_setting_so_adamw_can_use_foreach():
    model = _Model()
    groups = get_optimizer_params(model, base_lr=1e-4, weight_decay=1e-4, weight_decay_norm=0.0)
    settings = [(g["lr"], g["weight_decay"]) for g in groups]
    # backbone conv (lr/10, decay), backbone BN (lr/10, 0), the rest (lr, decay), LayerNorm (lr, 0)
    assert sorted(settings) == sorted(
        [(1e-4 * 0.1, 1e-4), (1e-4 * 0.1, 0.0), (1e-4, 1e-4), (1e-4, 0.0)]
    )
    # Without a separate norm decay: the backbone's learning rate and the rest's.
    assert len(get_optimizer_params(model, base_lr=1e-4, weight_decay=1e-4)) == 2
    # Within a group, parameters keep the model's order.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for group in groups:
        positions = [order[id(p)] for p in group["params"]]
        assert positions == sorted(positions)


def test_merged_groups_step_like_one_group_per_tensor():
    """AdamW over the merged groups updates every parameter as over one group per tensor."""
    torch.manual_seed(0)
    merged, single = _Model(), _Model()
    single.load_state_dict(merged.state_dict())
    kwargs = dict(base_lr=1e-2, weight_decay=0.1, weight_decay_norm=0.0)
    per_tensor = [
        {"params": [p], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in get_optimizer_params(single, **kwargs)
        for p in g["params"]
    ]
    optimizers = [
        torch.optim.AdamW(get_optimizer_params(merged, **kwargs)),
        torch.optim.AdamW(per_tensor, foreach=False),
    ]
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        for model, optimizer in zip((merged, single), optimizers):
            optimizer.zero_grad()
            features = model.backbone.convs(model.backbone.bottom_up(x)).mean((2, 3))
            loss = model.heads[0](model.norm(features)).square().sum()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(merged.named_parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_norms_keep_the_weight_decay_by_default():
    model = _Model()
    groups = get_optimizer_params(model, base_lr=1.0, weight_decay=0.5)
    assert {g["weight_decay"] for g in groups} == {0.5}


def test_lr_factor_func_multiplies_the_backbone_factor():
    model = _Model()
    seen = []

    def factor(name):
        seen.append(name)
        return 0.5 if name.startswith("backbone.bottom_up.0.") else 1.0

    groups = get_optimizer_params(model, base_lr=1.0, weight_decay=0.0, lr_factor_func=factor)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_param[id(model.backbone.bottom_up[0].weight)] == 0.1 * 0.5
    assert by_param[id(model.backbone.bottom_up[1].weight)] == 0.1
    assert by_param[id(model.heads[0].weight)] == 1.0
    # Called once per trainable parameter with its full name; shared ones under their first name.
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "heads.0.weight" in seen and "heads.1.weight" not in seen


def test_without_lr_factor_func_nothing_changes():
    model = _Model()
    plain = get_optimizer_params(model, base_lr=1e-4, weight_decay=1e-4)
    ones = get_optimizer_params(
        model, base_lr=1e-4, weight_decay=1e-4, lr_factor_func=lambda n: 1.0
    )
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [
        (g["lr"], g["weight_decay"]) for g in ones
    ]
