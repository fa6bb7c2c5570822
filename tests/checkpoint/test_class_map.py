"""Class-head remapping: a checkpoint of one label set initialises a model of another."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import instantiate

from dino_d2.checkpoint import AtomicCheckpointer
from dino_d2.checkpoint.class_map import (
    ClassMap,
    get_class_map,
    is_class_head,
    register_class_map,
    remap_class_rows,
)
from dino_d2.cli.train_net import load_initial_weights
from dino_d2.data.objects365_coco_map import coco_thing_classes


def _state(num_classes, width=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "transformer.decoder.class_embed.0.weight": torch.randn(
            num_classes, width, generator=generator
        ),
        "transformer.decoder.class_embed.0.bias": torch.randn(num_classes, generator=generator),
        "transformer.query_selection.class_embed.bias": torch.randn(
            num_classes, generator=generator
        ),
        "denoising.label_enc.weight": torch.randn(num_classes, width, generator=generator),
        "transformer.level_embed": torch.randn(4, width, generator=generator),
    }


def test_is_class_head():
    heads = [k for k in _state(2) if is_class_head(k)]
    assert heads == list(_state(2))[:4]
    assert not is_class_head("transformer.decoder.bbox_embed.0.layers.0.weight")


def test_rows_move_as_the_map_says_and_unmatched_rows_are_untouched():
    class_map = ClassMap(name="t", rows=(4, None, 0), num_source=5)
    source, model = _state(5, seed=1), _state(3, seed=2)
    remapped = remap_class_rows(source, model, class_map)
    for key in list(source)[:4]:
        assert remapped[key].shape[0] == 3
        assert torch.equal(remapped[key][0], source[key][4])
        assert torch.equal(remapped[key][2], source[key][0])
        assert torch.equal(remapped[key][1], model[key][1])
    # Not a class head: passed on as it was; the inputs are not modified.
    assert remapped["transformer.level_embed"] is source["transformer.level_embed"]
    assert torch.equal(
        model["denoising.label_enc.weight"], _state(3, seed=2)["denoising.label_enc.weight"]
    )


def test_size_mismatches_are_named():
    class_map = ClassMap(name="t", rows=(4, None, 0), num_source=5)
    with pytest.raises(
        ValueError, match=r"maps 5 source classes, but the checkpoint's .* has 6 rows"
    ):
        remap_class_rows(_state(6), _state(3), class_map)
    with pytest.raises(ValueError, match=r"model's .* has shape \(4, 3\).*model.num_classes=3"):
        remap_class_rows(_state(5), _state(4), class_map)
    with pytest.raises(ValueError, match="none of the model's class heads"):
        remap_class_rows({"backbone.w": torch.zeros(1)}, _state(3), class_map)


def test_a_map_uses_each_source_row_once_and_in_range():
    with pytest.raises(ValueError, match="used twice"):
        ClassMap(name="t", rows=(1, 1), num_source=3)
    with pytest.raises(ValueError, match=r"\[3\] are outside \[0, 3\)"):
        ClassMap(name="t", rows=(3, None), num_source=3)


def test_named_maps():
    class_map = get_class_map("objects365_v2_to_coco")
    assert class_map.num_source == 365 and class_map.num_target == 80
    assert [class_map.target_classes[j] for j in class_map.unmatched()] == ["sports ball"]
    with pytest.raises(KeyError, match="objects365_v1_to_coco, objects365_v2_to_coco"):
        get_class_map("objects365_to_lvis")


def _tiny_pair(tiny_dino_config, tmp_path):
    """A 365-class tiny model saved as a checkpoint, and a fresh 80-class one."""
    cfg = tiny_dino_config(decoder_layers=2)
    cfg.model.num_classes = 365
    torch.manual_seed(0)
    source = instantiate(cfg.model)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "finetune").mkdir()
    AtomicCheckpointer(source, str(tmp_path / "pretrain")).save("model_final")
    cfg.model.num_classes = 80
    torch.manual_seed(1)
    return source, instantiate(cfg.model)


def test_fine_tune_init_copies_the_matched_rows(tiny_dino_config, tmp_path, caplog):
    source, target = _tiny_pair(tiny_dino_config, tmp_path)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    train = OmegaConf.create(
        {
            "init_checkpoint": str(tmp_path / "pretrain" / "model_final.pth"),
            "init_class_map": "objects365_v2_to_coco",
        }
    )
    checkpointer = AtomicCheckpointer(target, str(tmp_path / "finetune"))
    with caplog.at_level(logging.INFO):
        load_initial_weights(checkpointer, train, resume=False)
    rows = get_class_map("objects365_v2_to_coco").rows
    matched = [j for j, r in enumerate(rows) if r is not None]
    sports_ball = coco_thing_classes().index("sports ball")
    own, pretrained = target.state_dict(), source.state_dict()
    heads = [k for k in own if is_class_head(k)]
    assert len(heads) >= 4  # decoder layers, query selection, label_enc
    for key in heads:
        assert own[key].shape[0] == 80
        assert torch.equal(own[key][matched], pretrained[key][[rows[j] for j in matched]])
        assert torch.equal(own[key][sports_ball], fresh[key][sports_ball])
    assert torch.equal(own["transformer.level_embed"], pretrained["transformer.level_embed"])
    lines = [r.getMessage() for r in caplog.records if "Class map" in r.getMessage()]
    assert len(lines) == 1 and "79 of 80 classes matched" in lines[0] and "sports ball" in lines[0]
    assert "class heads have" not in caplog.text  # nothing was skipped for its shape


def test_resume_does_not_apply_the_map(tiny_dino_config, tmp_path):
    source, target = _tiny_pair(tiny_dino_config, tmp_path)
    AtomicCheckpointer(target, str(tmp_path / "finetune")).save("model_0000009")
    saved = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    train = OmegaConf.create(
        {
            "init_checkpoint": str(tmp_path / "pretrain" / "model_final.pth"),
            "init_class_map": "objects365_v2_to_coco",
        }
    )
    load_initial_weights(AtomicCheckpointer(target, str(tmp_path / "finetune")), train, resume=True)
    assert all(torch.equal(v, saved[k]) for k, v in target.state_dict().items())


def test_a_map_without_init_checkpoint_is_refused(tiny_dino_config, tmp_path):
    _, target = _tiny_pair(tiny_dino_config, tmp_path)
    train = OmegaConf.create({"init_checkpoint": "", "init_class_map": "objects365_v2_to_coco"})
    with pytest.raises(ValueError, match="needs train.init_checkpoint"):
        load_initial_weights(AtomicCheckpointer(target, str(tmp_path)), train, resume=False)


def test_a_map_registered_from_outside(tmp_path):
    register_class_map("test_three_to_two", lambda: ClassMap(name="x", rows=(2, 0), num_source=3))
    class_map = get_class_map("test_three_to_two")
    remapped = remap_class_rows(_state(3), _state(2), class_map)
    assert torch.equal(
        remapped["denoising.label_enc.weight"][0], _state(3)["denoising.label_enc.weight"][2]
    )
