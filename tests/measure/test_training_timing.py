"""The benchmark times the training script's iterations: the step and its hooks."""

import itertools
import math

import torch

from dino_d2.engine import build_training
from dino_d2.measure import random_batches, time_training


def test_timed_iterations_run_the_scripts_hooks(tiny_dino_config, monkeypatch):
    """The config's clipping, EMA, learning-rate schedule and (unless the user chose the
    count) adaptive threads all run in the timed iterations."""
    cfg = tiny_dino_config()
    cfg.train.model_ema.enabled = True
    batch = random_batches(1, 1, 64, 64, num_boxes=2, num_classes=cfg.model.num_classes)[0]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    training = build_training(cfg, "cpu", data_loader=itertools.repeat(batch))
    before = {k: v.clone() for k, v in training.ema.state.items()}
    results = time_training(training, num_iter=2, warmup=1)
    assert training.ema.num_updates == 3 and training.trainer.iter == 3
    assert any(not torch.equal(before[k], v) for k, v in training.ema.state.items())
    assert len(training.trainer.storage.history("lr").values()) == 3
    assert math.isfinite(results["total_loss"]) and results["threads"] == [1, 1]
    assert 0 < results["step_s_min"] <= results["step_s_median"]
