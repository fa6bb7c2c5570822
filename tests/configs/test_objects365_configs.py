"""The Objects365 pre-training config and the COCO fine-tuning config that starts from it."""

import torch
from detectron2.config import LazyConfig, instantiate

from dino_d2.checkpoint import AtomicCheckpointer
from dino_d2.checkpoint.class_map import get_class_map, is_class_head
from dino_d2.cli.train_net import load_initial_weights
from dino_d2.data.objects365 import OBJECTS365_DATASETS
from dino_d2.engine.train_keys import check_train_keys
from dino_d2.model_zoo import get_config

PRETRAIN = "dino_swin_large_384_5scale_objects365v2_26ep.py"
FINETUNE = "dino_swin_large_384_5scale_objects365v2_coco_18ep.py"
# Iterations per epoch: Objects365 v2 (about 1.74M images) at batch 64; COCO at batch 16.
OBJECTS365_EPOCH, COCO_EPOCH = 27200, 7500


def _assert_swin_large_5scale_recipe(cfg):
    """What both stages share with the COCO Swin-L 5-scale recipe, plus 1000 DN queries and AMP."""
    assert list(cfg.model.backbone.bottom_up.depths) == [2, 2, 18, 2]
    assert cfg.model.backbone.bottom_up.embed_dim == 192
    assert cfg.model.backbone.bottom_up.use_checkpoint
    assert cfg.model.transformer.num_levels == 5
    assert cfg.model.transformer.query_selection.num_queries == 900
    assert cfg.model.denoising.dn_number == 1000
    assert cfg.train.amp.enabled
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.backbone_lr_factor == 0.1
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.max_norm == 0.1


def test_pretraining_recipe():
    cfg = get_config(PRETRAIN)
    _assert_swin_large_5scale_recipe(cfg)
    assert cfg.dataloader.train.dataset.names == "objects365_v2_train"
    assert cfg.dataloader.test.dataset.names == "objects365_v2_val"
    assert {"objects365_v2_train", "objects365_v2_val"} <= set(OBJECTS365_DATASETS)
    assert cfg.model.num_classes == 365
    assert cfg.dataloader.train.total_batch_size == 64
    assert cfg.train.max_iter == 26 * OBJECTS365_EPOCH
    assert list(cfg.lr_multiplier.milestones) == [24 * OBJECTS365_EPOCH, 26 * OBJECTS365_EPOCH]
    # The COCO recipe's augmentation, unchanged ("the default setting").
    coco = get_config("dino_swin_large_384_5scale_12ep.py").dataloader
    assert cfg.dataloader.train.mapper.augmentations == coco.train.mapper.augmentations
    assert cfg.dataloader.test.mapper.augmentations == coco.test.mapper.augmentations


def test_finetuning_recipe_starts_from_the_pretraining():
    pretrain, cfg = get_config(PRETRAIN), get_config(FINETUNE)
    _assert_swin_large_5scale_recipe(cfg)
    assert cfg.dataloader.train.dataset.names == "coco_2017_train"
    assert cfg.dataloader.test.dataset.names == "coco_2017_val"
    assert cfg.model.num_classes == 80
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.max_iter == 18 * COCO_EPOCH
    assert list(cfg.lr_multiplier.milestones) == [16 * COCO_EPOCH, 18 * COCO_EPOCH]
    assert cfg.train.init_checkpoint == f"{pretrain.train.output_dir}/model_final.pth"
    class_map = get_class_map(cfg.train.init_class_map)
    assert class_map.num_source == pretrain.model.num_classes
    assert class_map.num_target == cfg.model.num_classes
    # 1.5x the COCO recipe's image sizes.
    train_aug = cfg.dataloader.train.mapper.augmentations
    assert min(train_aug.min_sizes) == 720 and max(train_aug.min_sizes) == 1200
    assert train_aug.max_size == 2000
    (test_resize,) = instantiate(cfg.dataloader.test.mapper.augmentations)
    assert (test_resize.short_edge_length, test_resize.max_size) == ((1200, 1200), 2000)


def test_the_training_script_reads_every_train_key():
    for name in (PRETRAIN, FINETUNE):
        assert check_train_keys(get_config(name).train) == []


def test_configs_save_as_plain_yaml(tmp_path):
    for name in (PRETRAIN, FINETUNE):
        path = str(tmp_path / f"{name}.yaml")
        LazyConfig.save(get_config(name), path)
        again = LazyConfig.load(path)
        assert again.model.num_classes == get_config(name).model.num_classes
    assert again.train.init_class_map == "objects365_v2_to_coco"


def _shrunk_model(name):
    """The config's model with a one-block-per-stage narrow Swin and a small transformer."""
    cfg = get_config(name)
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.update(embed_dim=48, depths=[1, 1, 1, 1], drop_path_rate=0.0, use_checkpoint=False)
    t = cfg.model.transformer
    t.encoder.num_layers, t.decoder.num_layers = 1, 2
    t.query_selection.num_queries = 20
    t.encoder.layer.ffn_dim = t.decoder.layer.ffn_dim = 64
    return cfg, instantiate(cfg.model)


def test_the_finetune_starts_from_the_pretrained_class_rows(tmp_path):
    torch.manual_seed(0)
    _, pretrained = _shrunk_model(PRETRAIN)
    (tmp_path / "pretrain").mkdir()
    AtomicCheckpointer(pretrained, str(tmp_path / "pretrain")).save("model_final")
    torch.manual_seed(1)
    cfg, model = _shrunk_model(FINETUNE)
    cfg.train.init_checkpoint = str(tmp_path / "pretrain" / "model_final.pth")
    load_initial_weights(AtomicCheckpointer(model, str(tmp_path)), cfg.train, resume=False)
    rows = get_class_map(cfg.train.init_class_map).rows
    matched = [j for j, r in enumerate(rows) if r is not None]
    own, source = model.state_dict(), pretrained.state_dict()
    heads = [k for k in own if is_class_head(k)]
    assert any("label_enc" in k for k in heads) and any("query_selection" in k for k in heads)
    for key in heads:
        assert torch.equal(own[key][matched], source[key][[rows[j] for j in matched]])
    assert torch.equal(own["transformer.level_embed"], source["transformer.level_embed"])
