"""DINO on plain ViTs: the timm ViT config (any Detectron2) and DINO-ViTDet (Detectron2 main)."""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from dino_d2._compat import detectron2_has_vitdet
from dino_d2.engine import ViTLayerDecay
from dino_d2.model_zoo import get_config
from dino_d2.modeling.backbone import SimplePyramid, TimmBackbone

VITDET = "dino_vitdet_b_4scale_12ep.py"
TIMM_VIT = "dino_timm_vit_small_4scale_12ep.py"


def _shrink(cfg, depth=2):
    """The ViT cut to ``depth`` blocks, one encoder and two decoder layers, 20 queries."""
    t = cfg.model.transformer
    t.encoder.num_layers, t.decoder.num_layers = 1, 2
    t.query_selection.num_queries = 20
    t.encoder.layer.ffn_dim = t.decoder.layer.ffn_dim = 64
    cfg.model.denoising.dn_number = 6
    net = cfg.model.backbone.bottom_up.net
    net.depth = depth
    # Stochastic depth would randomly cut a block's gradient in a two-step test.
    net.drop_path_rate = 0.0
    cfg.train.device = "cpu"
    return cfg


def _sample(h, w, n, generator):
    instances = Instances((h, w))
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
    wh = (0.1 + 0.4 * torch.rand(n, 2, generator=generator)) * torch.tensor([w, h])
    instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
    instances.gt_classes = torch.randint(0, 80, (n,), generator=generator)
    return {"image": torch.rand(3, h, w, generator=generator) * 255, "instances": instances}


def _train_two_steps_and_infer(cfg):
    """Two optimizer steps with the config's own parameter groups, then inference."""
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    generator = torch.Generator().manual_seed(0)
    # Neither size is a multiple of the patch size (16) nor of the pyramid's stride (32).
    batch = [_sample(100, 120, 3, generator), _sample(70, 90, 1, generator)]

    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
        optimizer.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reaches {no_grad}"

    model.eval()
    inputs = [{"image": b["image"], "height": 50, "width": 60} for b in batch]
    with torch.no_grad():
        batched = model(inputs)
        single = [model([x])[0] for x in inputs]
    for output, alone in zip(batched, single):
        instances = output["instances"]
        assert instances.image_size == (50, 60)
        assert 0 < len(instances) <= 300 and torch.isfinite(instances.pred_boxes.tensor).all()
        assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
        # Padding to the pyramid's stride does not make detections depend on the batch.
        torch.testing.assert_close(instances.scores, alone["instances"].scores)
        torch.testing.assert_close(
            instances.pred_boxes.tensor, alone["instances"].pred_boxes.tensor
        )
    return model, optimizer


def test_timm_vit_trains_two_steps_and_infers():
    cfg = _shrink(get_config(TIMM_VIT))
    model, optimizer = _train_two_steps_and_infer(cfg)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, SimplePyramid) and isinstance(bottom_up.net, TimmBackbone)
    assert model.backbone.size_divisibility == 32
    assert {n: s.stride for n, s in model.backbone.output_shape().items()} == {
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    # Layer decay over the two remaining blocks (num_layers follows the ViT's depth).
    names = {id(p): n for n, p in model.named_parameters()}
    # Parameters with the same lr and weight decay share a group.
    lrs = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    vit = "backbone.bottom_up.net.body.model."
    assert lrs[vit + "pos_embed"] == pytest.approx(1e-4 * 0.7**3)
    assert lrs[vit + "blocks.1.attn.qkv.weight"] == pytest.approx(1e-4 * 0.7)
    assert lrs["backbone.bottom_up.levels.p3.0.weight"] == pytest.approx(1e-4)


def test_timm_vit_config_recipe():
    cfg = get_config(TIMM_VIT)
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up.net.model_name == "vit_small_patch16_224" and bottom_up.net.dynamic_img_size
    assert list(cfg.model.backbone.in_features) == ["p3", "p4", "p5"]
    assert cfg.model.backbone.num_extra_levels == 1 and cfg.model.transformer.num_levels == 4
    assert cfg.optimizer.params.backbone_lr_factor == 1.0
    decay = instantiate(cfg.optimizer.params.lr_factor_func)
    assert isinstance(decay, ViTLayerDecay) and (decay.num_layers, decay.decay_rate) == (12, 0.7)


def test_configs_save_and_load(tmp_path):
    for name in (TIMM_VIT, VITDET):
        path = str(tmp_path / name.replace(".py", ".yaml"))
        LazyConfig.save(get_config(name), path)
        again = LazyConfig.load(path)
        assert list(again.model.backbone.bottom_up.scale_factors) == [2.0, 1.0, 0.5]


def test_vitdet_config_recipe():
    """Loads on every Detectron2 version; only building needs main."""
    cfg = get_config(VITDET)
    net = cfg.model.backbone.bottom_up.net
    assert (net.embed_dim, net.depth, net.num_heads, net.patch_size) == (768, 12, 12, 16)
    assert list(net.window_block_indexes) == [0, 1, 3, 4, 6, 7, 9, 10] and net.use_rel_pos
    assert list(cfg.model.backbone.bottom_up.scale_factors) == [2.0, 1.0, 0.5]
    assert list(cfg.model.backbone.in_features) == ["p3", "p4", "p5"]
    assert cfg.model.backbone.num_extra_levels == 1 and cfg.model.transformer.num_levels == 4
    assert cfg.optimizer.params.backbone_lr_factor == 1.0
    decay = instantiate(cfg.optimizer.params.lr_factor_func)
    assert (decay.num_layers, decay.decay_rate) == (12, 0.7)
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.0) == pytest.approx(0.001)
    assert scheduler(250 / 90000) == pytest.approx(1.0)
    assert scheduler(82499 / 90000) == 1.0 and scheduler(82500 / 90000) == pytest.approx(0.1)
    assert cfg.train.max_iter == 90000 and cfg.optimizer.lr == 1e-4


@pytest.mark.skipif(detectron2_has_vitdet(), reason="the installed Detectron2 has ViTDet")
def test_vitdet_config_says_what_is_missing_on_detectron2_v06():
    cfg = get_config(VITDET)
    with pytest.raises(ImportError) as error:
        instantiate(cfg.model)
    message = str(error.value)
    assert "ViT (detectron2.modeling.backbone.vit.ViT) is missing from the installed" in message
    assert "only in Detectron2 main" in message
    assert "git+https://github.com/facebookresearch/detectron2.git" in message
    assert TIMM_VIT in message


@pytest.mark.skipif(not detectron2_has_vitdet(), reason="needs Detectron2 main's ViTDet")
def test_vitdet_trains_two_steps_and_infers_on_detectron2_main():
    cfg = _shrink(get_config(VITDET))
    cfg.model.backbone.bottom_up.net.embed_dim = 64
    cfg.model.backbone.bottom_up.net.num_heads = 2
    cfg.model.backbone.bottom_up.net.window_size = 4
    model, _ = _train_two_steps_and_infer(cfg)
    # Padded to the pyramid's coarsest stride (main's SimpleFeaturePyramid misspells the key).
    images = model.preprocess_image([{"image": torch.zeros(3, 70, 90)}])
    assert images.tensor.shape[-2:] == (96, 96)
