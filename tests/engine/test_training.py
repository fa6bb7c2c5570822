"""build_training: the training step of a config, as the script runs it and the benchmark times it."""

import itertools
import math

import pytest
import torch

from detectron2.engine import hooks

from dino_d2.engine import EMAHook, Training, amp_settings, build_training
from dino_d2.engine.threads import AdaptiveThreadsHook
from dino_d2.layers.frozen_bn import FrozenBNConv2d
from dino_d2.measure import random_batches


@pytest.fixture
def training_of(tiny_dino_config, monkeypatch):
    """Builds the training of the tiny config (EMA on) on one repeated random batch."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()

    def build(**train) -> Training:
        cfg = tiny_dino_config()
        cfg.train.model_ema.enabled = True
        cfg.train.update(train)
        num_classes = cfg.model.num_classes
        batch = random_batches(1, 1, 64, 64, num_boxes=2, num_classes=num_classes)[0]
        return build_training(cfg, "cpu", data_loader=itertools.repeat(batch))

    yield build
    torch.set_num_threads(threads)


def test_the_step_is_wired_from_the_config(training_of):
    training = training_of()
    trainer, options = training.trainer, training.options
    assert trainer.clip_grad_max_norm == options.clip_grad.max_norm
    # train.amp as configs/common/train.py sets it: "auto", bfloat16 where the CPU computes it.
    expected = amp_settings("cpu", options.amp.precision)[0] if options.amp.enabled else None
    assert trainer.amp_dtype == expected and training.ema is not None
    # The training transform: frozen batch norms folded into their convolutions.
    assert any(isinstance(m, FrozenBNConv2d) for m in training.model.modules())
    kinds = [type(hook) for hook in trainer._hooks]
    assert kinds == [hooks.IterationTimer, AdaptiveThreadsHook, hooks.LRScheduler, EMAHook]
    trained = [p for p in training.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    with training.steps() as step:
        step()
        step()
        storage = trainer.storage
        assert math.isfinite(storage.history("total_loss").latest())
        assert len(storage.history("lr").values()) == 2  # the schedule stepped every iteration
    assert trainer.iter == 2 and training.ema.num_updates == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))  # optimizer steps
    assert trainer._hooks[1].threads is not None  # adaptive threads, none chosen by the user


def test_steps_stop_at_the_end_of_the_schedule(training_of):
    training = training_of(max_iter=1)
    with training.steps() as step:
        step()
        with pytest.raises(ValueError, match="train.max_iter=1 iterations are done"):
            step()


def test_mixed_precision_and_no_clipping_follow_the_config(training_of):
    training = training_of(
        amp={"enabled": True, "precision": "bfloat16"}, clip_grad={"enabled": False}
    )
    assert training.trainer.amp_dtype == torch.bfloat16
    assert training.trainer.grad_scaler is None
    assert training.trainer.clip_grad_max_norm is None
