"""Every shipped variant loads, builds, trains a step and infers, at reduced size."""

import math

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from dino_d2.model_zoo import get_config, get_config_file, list_configs

REQUIRED = [
    "dino_r50_4scale_12ep",
    "dino_r50_4scale_24ep",
    "dino_r50_4scale_36ep",
    "dino_r50_5scale_12ep",
    "dino_r50_5scale_24ep",
    "dino_r50_5scale_36ep",
    "dino_r101_4scale_12ep",
    "dino_swin_tiny_224_4scale_12ep",
    "dino_swin_small_224_4scale_12ep",
    "dino_swin_base_384_4scale_12ep",
    "dino_swin_large_384_4scale_12ep",
    "dino_swin_large_384_4scale_36ep",
    "dino_swin_large_384_5scale_12ep",
    "dino_swin_large_384_5scale_36ep",
    "dino_regnety_4gf_4scale_12ep",
    "dino_timm_convnext_tiny_4scale_12ep",
]
# Schedule length and the epoch after which the learning rate drops tenfold (authors' lr_drop).
EPOCHS = {"12ep": (12, 11), "24ep": (24, 20), "36ep": (36, 30)}


# Configs that are not published recipes (tested on their own).
DEMOS = ["dino_r18_digits", "maskdino_r18_digits"]
# Mask DINO (tests/configs/test_maskdino_configs.py).
MASK_DINO = ["maskdino_r50_4scale_50ep", "maskdino_swin_large_384_5scale_50ep"]
# DINO on plain ViTs, with layer-wise lr decay (tests/configs/test_vit_configs.py).
VIT = ["dino_timm_vit_small_4scale_12ep", "dino_vitdet_b_4scale_12ep"]
# Objects365 pre-training and its COCO fine-tuning (tests/configs/test_objects365_configs.py).
OBJECTS365 = [
    "dino_swin_large_384_5scale_objects365v2_26ep",
    "dino_swin_large_384_5scale_objects365v2_coco_18ep",
]


def test_every_required_variant_ships():
    shipped = sorted(name[:-3] for name in list_configs())
    assert sorted(REQUIRED + DEMOS + VIT + OBJECTS365 + MASK_DINO) == shipped


@pytest.mark.parametrize("name", REQUIRED)
def test_defaults_match_the_published_recipe(name):
    cfg = get_config(name + ".py")
    epochs, drop = EPOCHS[name.rsplit("_", 1)[1]]
    assert cfg.train.max_iter == epochs * 7500
    assert list(cfg.lr_multiplier.milestones) == [drop * 7500, epochs * 7500]
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.backbone_lr_factor == 0.1
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.max_norm == 0.1
    assert cfg.model.num_select == 300
    t = cfg.model.transformer
    assert t.embed_dim == 256 and t.query_selection.num_queries == 900
    assert t.encoder.num_layers == t.decoder.num_layers == 6
    assert t.num_levels == (5 if "5scale" in name else 4)
    assert cfg.model.denoising.dn_number == 100
    assert (
        cfg.model.denoising.label_noise_ratio == 0.5 and cfg.model.denoising.box_noise_scale == 1.0
    )
    m = cfg.model.criterion.matcher
    assert dict(m.costs) == {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    assert dict(cfg.model.criterion.losses) == {
        "loss_class": 1.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
    }


def test_lr_drops_after_epoch_11_of_12():
    scheduler = instantiate(get_config("dino_r50_4scale_12ep.py").lr_multiplier)
    assert scheduler(82499 / 90000) == 1.0 and scheduler(82500 / 90000) == pytest.approx(0.1)


def test_config_saves_as_plain_yaml(tmp_path):
    cfg = get_config("dino_swin_large_384_5scale_36ep.py")
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    again = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert again.model.transformer.num_levels == 5
    assert list(again.model.backbone.bottom_up.depths) == [2, 2, 18, 2]


def _shrink(cfg):
    """Reduced layer counts and queries, through ordinary config overrides."""
    t = cfg.model.transformer
    t.encoder.num_layers = 1
    t.decoder.num_layers = 2
    t.query_selection.num_queries = 20
    t.encoder.layer.ffn_dim = t.decoder.layer.ffn_dim = 64
    cfg.model.denoising.dn_number = 6
    bottom_up = cfg.model.backbone.bottom_up
    if "depths" in bottom_up:
        bottom_up.depths = [1, 1, 1, 1]
        # Stochastic depth would randomly cut a block's gradient in a two-step test.
        bottom_up.drop_path_rate = 0.0
    return cfg


def _sample(h, w, n, generator):
    instances = Instances((h, w))
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
    wh = (0.1 + 0.4 * torch.rand(n, 2, generator=generator)) * torch.tensor([w, h])
    instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
    instances.gt_classes = torch.randint(0, 80, (n,), generator=generator)
    return {"image": torch.rand(3, h, w, generator=generator) * 255, "instances": instances}


@pytest.mark.parametrize("name", REQUIRED)
def test_variant_trains_a_step_and_infers(name):
    torch.manual_seed(0)
    cfg = _shrink(get_config(name + ".py"))
    model = instantiate(cfg.model)
    generator = torch.Generator().manual_seed(0)
    batch = [_sample(96, 128, 3, generator), _sample(72, 100, 1, generator)]

    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    # Two steps: at initialization the zero-initialized last box layers and attention
    # projections block some gradients by design; after one update every part must learn.
    for _ in range(2):
        optimizer.zero_grad()
        losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
        optimizer.step()
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reaches {no_grad}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if "r50" in name or "r101" in name or "regnet" in name:
        assert frozen and all(n.startswith("backbone.bottom_up.") for n in frozen)

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": b["image"], "height": 48, "width": 64} for b in batch])
    for output in outputs:
        instances = output["instances"]
        assert instances.image_size == (48, 64)
        assert len(instances) <= 300 and torch.isfinite(instances.pred_boxes.tensor).all()
        assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
        assert (instances.pred_classes < 80).all()


def test_configs_resolve_from_the_package():
    path = get_config_file("dino_r50_4scale_12ep.py")
    assert path.endswith("dino_r50_4scale_12ep.py")
    with pytest.raises(FileNotFoundError, match="dino_r50_4scale_13ep"):
        get_config_file("dino_r50_4scale_13ep.py")
