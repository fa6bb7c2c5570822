"""The Mask DINO configs hold the authors' recipes (IDEA-Research/MaskDINO,
configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml and
swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml) and build."""

import pytest
import torch

from detectron2.config import instantiate
from detectron2.structures import BitMasks, Boxes, Instances

from dino_d2.model_zoo import get_config
from dino_d2.projects.mask_dino import MaskDINO

# name -> (backbone levels the encoder reads, encoder levels, res2 channels, box init)
RECIPES = {
    "maskdino_r50_4scale_50ep": (["res3", "res4", "res5"], 4, 256, "mask2box"),
    "maskdino_swin_large_384_5scale_50ep": (["res2", "res3", "res4", "res5"], 5, 192, "bitmask"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_authors_recipe(name):
    in_features, num_levels, res2_channels, box_init = RECIPES[name]
    cfg = get_config(name + ".py")
    model = cfg.model
    assert model.backbone.in_features == in_features
    assert "res2" in model.backbone.bottom_up.out_features
    assert model.transformer.num_levels == num_levels
    assert model.heads.masks.pixel_decoder.in_channels == res2_channels
    assert model.mask_box_init == box_init
    assert model.transformer.encoder.num_layers == 6 and model.transformer.decoder.num_layers == 9
    assert (
        model.transformer.encoder.layer.ffn_dim == model.transformer.decoder.layer.ffn_dim == 2048
    )
    assert model.transformer.query_selection.num_queries == 300
    assert model.denoising.dn_number == 100 and model.denoising.box_noise_scale == 0.4
    assert model.num_select == 100
    assert dict(model.criterion.losses) == dict(
        loss_class=4.0, loss_bbox=5.0, loss_giou=2.0, loss_mask=5.0, loss_dice=5.0
    )
    assert dict(model.criterion.matcher.costs) == dict(
        cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0
    )
    assert model.criterion.matcher.cost_options.cost_mask.num_points == 12544
    # 50 epochs of COCO at batch 16, the drops of the authors' STEPS.
    assert cfg.train.max_iter == 368750 and cfg.dataloader.train.total_batch_size == 16
    assert list(cfg.lr_multiplier.milestones) == [327778, 355092, 368750]
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.05
    assert cfg.train.clip_grad.max_norm == 0.01
    assert list(cfg.dataloader.evaluator.tasks) == ["bbox", "segm"]
    assert cfg.dataloader.train.mapper.use_instance_mask


def test_the_r50_recipe_builds():
    torch.manual_seed(0)
    cfg = get_config("maskdino_r50_4scale_50ep.py")
    model = instantiate(cfg.model)
    assert isinstance(model, MaskDINO)
    assert model.heads["masks"].norm is model.transformer.decoder.norm
    assert len(model.transformer.decoder.class_embed) == 9


def test_the_digits_config_is_the_box_demo_with_masks():
    cfg = get_config("maskdino_r18_digits.py")
    box_demo = get_config("dino_r18_digits.py")
    assert cfg.train.max_iter == box_demo.train.max_iter
    assert cfg.model.transformer.embed_dim == box_demo.model.transformer.embed_dim == 128
    assert cfg.model.num_classes == 10 and cfg.model.num_select == box_demo.model.num_select
    assert cfg.dataloader.train.mapper.use_instance_mask
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    instances = Instances((96, 128))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 40.0, 70.0]]))
    instances.gt_classes = torch.tensor([3])
    masks = torch.zeros(1, 96, 128, dtype=torch.bool)
    masks[0, 20:70, 10:40] = True
    instances.gt_masks = BitMasks(masks)
    image = torch.rand(3, 96, 128) * 255
    losses = model([{"image": image, "instances": instances}])
    assert {"loss_mask", "loss_dice", "loss_mask_enc", "loss_dice_dn"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": image}])
    assert result["instances"].pred_masks.shape == (cfg.model.num_select, 96, 128)
