"""TrainOptions: ``train`` read into typed options; the known keys are its fields."""

import dataclasses
import glob
import logging
import os

import pytest
from omegaconf import OmegaConf

from detectron2.config import LazyConfig

from dino_d2.engine import TrainOptions, check_train_keys, known_train_keys
from dino_d2.engine.train_options import AmpOptions, option_keys
from dino_d2.model_zoo import get_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def test_defaults_are_those_of_the_common_config():
    common = LazyConfig.load(os.path.join(CONFIGS, "common", "train.py")).train
    assert TrainOptions.from_config(common) == TrainOptions()
    assert TrainOptions.from_config({}) == TrainOptions()


def test_every_shipped_config_reads():
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
        cfg = get_config(os.path.basename(path))
        options = TrainOptions.from_config(cfg.train)
        assert (
            options.max_iter == cfg.train.max_iter and options.amp.enabled == cfg.train.amp.enabled
        )


def test_values_and_sub_dicts_are_read():
    train = OmegaConf.create(
        {
            "max_iter": 7,
            "amp": {"enabled": True},
            "clip_grad": {"max_norm": 1},
            "checkpointer": {"period": 3},
            "device": "cpu",
        }
    )
    options = TrainOptions.from_config(train)
    assert options.max_iter == 7 and options.device == "cpu"
    assert options.amp == AmpOptions(enabled=True, precision="auto")
    assert options.clip_grad.max_norm == 1 and options.clip_grad.enabled
    assert options.checkpointer == {"period": 3}  # handed whole to PeriodicCheckpointer


@pytest.mark.parametrize(
    "train, message",
    [
        ({"max_iter": "5"}, "train.max_iter must be an integer, got '5'"),
        ({"max_iter": True}, "train.max_iter must be an integer, got True"),
        ({"amp": {"enabled": "yes"}}, "train.amp.enabled must be True or False, got 'yes'"),
        ({"amp": True}, "train.amp must be a dict of options, got True"),
        ({"ddp": 3}, "train.ddp must be a dict of keyword arguments, got 3"),
        ({"device": 0}, "train.device must be a string or None, got 0"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(train, message):
    with pytest.raises(ValueError) as error:
        TrainOptions.from_config(train)
    assert str(error.value) == message


@dataclasses.dataclass(frozen=True)
class _WithWarmupFrames(TrainOptions):
    """A training that reads one more option: one new field, nothing else."""

    warmup_frames: int = 3


def test_a_new_option_is_one_field(caplog):
    assert "warmup_frames" in option_keys(_WithWarmupFrames)
    assert "warmup_frames" not in known_train_keys()
    train = OmegaConf.create({"max_iter": 1, "warmup_frames": 5})
    assert _WithWarmupFrames.from_config(train).warmup_frames == 5
    assert check_train_keys(train, _WithWarmupFrames) == []
    train.warmup_frame = 4
    with caplog.at_level(logging.WARNING):
        assert check_train_keys(train, _WithWarmupFrames) == ["warmup_frame"]
    assert "did you mean train.warmup_frames?" in caplog.records[-1].getMessage()


def test_known_keys_are_the_fields_and_the_handed_over_arguments():
    keys = set(option_keys())
    leaves = {"output_dir", "max_iter", "amp.precision", "model_ema.use_for_eval", "seed"}
    assert leaves <= keys and "amp" not in keys and "ddp" not in keys
    # create_ddp_model's own argument and DistributedDataParallel's; PeriodicCheckpointer's.
    assert {"ddp.fp16_compression", "ddp.find_unused_parameters"} <= keys
    assert {"checkpointer.period", "checkpointer.max_to_keep"} <= keys
    assert "ddp.module" not in keys and "checkpointer.checkpointer" not in keys
