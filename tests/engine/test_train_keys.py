"""The check of the keys under ``train``: typos are reported with the nearest known key."""

import glob
import logging
import os

import pytest
from omegaconf import OmegaConf

from detectron2.config import LazyConfig

from dino_d2.engine import train_keys
from dino_d2.engine.train_keys import check_train_keys, declare_train_keys
from dino_d2.model_zoo import get_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.fixture
def declared():
    """Restores the declared keys after the test."""
    saved = set(train_keys._DECLARED)
    yield
    train_keys._DECLARED.clear()
    train_keys._DECLARED.update(saved)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dino_d2.engine.train_keys"]


def test_every_key_of_the_shipped_configs_is_known(caplog):
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py")))
    assert len(names) > 10
    for name in names:
        with caplog.at_level(logging.WARNING):
            assert check_train_keys(get_config(name).train) == [], name
    assert _warnings(caplog) == []


def test_a_mistyped_override_warns_with_the_nearest_key(caplog):
    cfg = get_config("dino_r18_digits.py")
    cfg = LazyConfig.apply_overrides(
        cfg, ["train.max_itr=5", "train.amp.precison=bfloat16", "train.ddp.static_grph=True"]
    )
    with caplog.at_level(logging.WARNING):
        unknown = check_train_keys(cfg.train)
    assert unknown == ["amp.precison", "ddp.static_grph", "max_itr"]
    messages = _warnings(caplog)
    assert len(messages) == 3
    by_key = {m.split("=")[0]: m for m in messages}
    assert "did you mean train.max_iter?" in by_key["train.max_itr"]
    assert "train.max_itr=5 is not read" in by_key["train.max_itr"]
    assert "did you mean train.amp.precision?" in by_key["train.amp.precison"]
    # train.ddp goes to DistributedDataParallel: its arguments are known keys.
    assert "did you mean train.ddp.static_graph?" in by_key["train.ddp.static_grph"]
    assert all("declare_train_keys" in m for m in messages)


def test_keys_handed_to_detectron2_parts_are_known(caplog):
    train = OmegaConf.create(
        {
            "max_iter": 1,
            "ddp": {"gradient_as_bucket_view": True, "bucket_cap_mb": 10},
            "checkpointer": {"period": 5, "file_prefix": "dino", "max_to_keep": 2},
            "amp": {},
        }
    )
    with caplog.at_level(logging.WARNING):
        assert check_train_keys(train) == []
    train.unrelated = 3
    with caplog.at_level(logging.WARNING):
        assert check_train_keys(train) == ["unrelated"]
    assert "did you mean" not in _warnings(caplog)[-1]


def test_declared_keys_of_own_hooks_are_not_reported(declared, caplog):
    train = OmegaConf.create({"max_iter": 1, "my_hook": {"period": 3, "scale": 0.5}, "extra": 1})
    with caplog.at_level(logging.WARNING):
        assert check_train_keys(train) == ["my_hook.period", "my_hook.scale", "extra"]
    declare_train_keys("train.my_hook", "extra")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check_train_keys(train) == []
    assert _warnings(caplog) == []
    declare_train_keys("other.period")
    train.other = {"period": 1, "perod": 2}
    assert check_train_keys(train) == ["other.perod"]
    with pytest.raises(ValueError, match="dotted key names"):
        declare_train_keys("")
