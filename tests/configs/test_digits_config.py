"""The embedded demo's config: the intended sizes, a working model and plain-YAML saving."""

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone import ResNet
from detectron2.structures import Boxes, Instances

from dino_d2.model_zoo import get_config


@pytest.fixture(scope="module")
def cfg():
    return get_config("dino_r18_digits.py")


def test_sizes_and_schedule(cfg):
    t = cfg.model.transformer
    assert t.embed_dim == 128 and t.position_embedding.num_pos_feats == 64
    assert t.encoder.num_layers == t.decoder.num_layers == 3
    assert t.encoder.layer.ffn_dim == t.decoder.layer.ffn_dim == 512
    assert t.query_selection.num_queries == 50 and t.num_levels == 4
    assert cfg.model.denoising.dn_number == 10 and cfg.model.num_classes == 10
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up.stages.depth == 18 and bottom_up.freeze_at == 0
    assert bottom_up.stem.norm == bottom_up.stages.norm == "BN"
    assert cfg.dataloader.train.dataset.names == "digits_train"
    assert cfg.dataloader.test.dataset.names == "digits_val"
    assert cfg.dataloader.test.mapper.augmentations.min_size == 192
    assert cfg.dataloader.train.mapper.augmentations.horizontal_flip is False
    assert cfg.dataloader.train.mapper.augmentations.crop_prob == 0.0
    assert cfg.dataloader.train.total_batch_size == 8
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.params.backbone_lr_factor == 1.0
    assert cfg.train.max_iter == 1900 and cfg.train.init_checkpoint == ""
    assert cfg.train.eval_period == cfg.train.checkpointer.period == 475
    # bfloat16 autocast where the hardware computes it, float32 elsewhere (common/train.py).
    assert cfg.train.amp.enabled and cfg.train.amp.precision == "auto"
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.0) == pytest.approx(0.01)
    assert scheduler(0.86) == 1.0 and scheduler(0.88) == pytest.approx(0.1)


def test_model_is_trainable_from_scratch_and_infers(cfg):
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up, ResNet)
    assert all(p.requires_grad for p in model.parameters())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    instances = Instances((96, 96))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 50.0, 90.0, 80.0]]))
    instances.gt_classes = torch.tensor([3, 7])
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": instances}] * 2
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": batch[0]["image"]}])
    assert len(output["instances"]) == cfg.model.num_select == 50
    assert (output["instances"].pred_classes < 10).all()


def test_saves_as_plain_yaml(cfg, tmp_path):
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    again = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert again.model.transformer.embed_dim == 128
    assert list(again.dataloader.train.mapper.augmentations.min_sizes) == [176, 192, 208]
