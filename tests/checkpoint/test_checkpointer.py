"""AtomicCheckpointer: Detectron2's checkpointer with files that are never half-written."""

import logging
import os

import pytest
import torch
from torch import nn

from detectron2.config import instantiate

from dino_d2.checkpoint import AtomicCheckpointer


def test_save_writes_the_checkpoint_and_the_pointer_and_leaves_no_temporary_file(tmp_path):
    model = nn.Linear(2, 3)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    (tmp_path / "plain").write_bytes(b"")  # permissions follow the umask, as for this file
    mode = os.stat(tmp_path / "plain").st_mode
    assert os.stat(tmp_path / "model_0000004.pth").st_mode == mode
    assert os.stat(tmp_path / "last_checkpoint").st_mode == mode
    assert checkpointer.get_checkpoint_file() == os.path.join(tmp_path, "model_0000004.pth")
    other = nn.Linear(2, 3)
    loaded = AtomicCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 4
    assert torch.equal(other.weight, model.weight)


def test_the_first_save_removes_temporary_files_of_killed_writes_only(tmp_path):
    stale = tmp_path / ".model_0000299.pth.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1e9, 1e9))
    kept = [".model_0000299.pth.tmp", ".notes.0123456789ab.tmp.txt", "model.0123456789ab.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1e9, 1e9))
    checkpointer = AtomicCheckpointer(nn.Linear(2, 3), str(tmp_path))
    # Written after the checkpointer was created (another writer's file in flight): kept.
    live = tmp_path / ".last_checkpoint.ba9876543210.tmp"
    live.write_bytes(b"")
    checkpointer.save("model_0000299")
    assert not stale.exists() and live.exists()
    expected = sorted(kept + [live.name, "last_checkpoint", "model_0000299.pth"])
    assert sorted(os.listdir(tmp_path)) == expected
    stale.write_bytes(b"")
    os.utime(stale, (1e9, 1e9))
    checkpointer.save("model_0000300")  # only the first save looks
    assert stale.exists()


def test_not_the_main_process_writes_nothing(tmp_path):
    AtomicCheckpointer(nn.Linear(2, 3), str(tmp_path), save_to_disk=False).save("model_final")
    assert os.listdir(tmp_path) == []


def test_class_head_mismatch_names_model_num_classes(tiny_dino_config, tmp_path, caplog):
    cfg = tiny_dino_config()
    cfg.model.num_classes = 10
    source = instantiate(cfg.model)
    AtomicCheckpointer(source, str(tmp_path)).save("model_final")
    cfg.model.num_classes = 3
    target = instantiate(cfg.model)
    with caplog.at_level(logging.WARNING):
        AtomicCheckpointer(target).load(str(tmp_path / "model_final.pth"))
    warnings = [r.getMessage() for r in caplog.records if "class heads" in r.getMessage()]
    assert len(warnings) == 1
    assert "[10] classes" in warnings[0] and "model.num_classes) 3" in warnings[0]
    assert "set model.num_classes=10" in warnings[0]
    # Everything else was loaded.
    assert torch.equal(target.transformer.level_embed, source.transformer.level_embed)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        AtomicCheckpointer(source).load(str(tmp_path / "model_final.pth"))
    assert "class heads" not in caplog.text
