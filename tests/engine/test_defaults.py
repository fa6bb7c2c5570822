"""default_setup: the job's logging, saved config and seeds; the device."""

import argparse
import logging

import pytest
import torch

from detectron2.config import LazyConfig

from dino_d2.engine import default_setup, resolve_device
from dino_d2.model_zoo import get_config, get_config_file


@pytest.fixture
def restore_loggers():
    names = ("detectron2", "dino_d2", "fvcore")
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names
    }
    level = {n: logging.getLogger(n).level for n in names}
    yield
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers = handlers
        logger.propagate = propagate
        logger.setLevel(level[name])


def test_default_setup_writes_config_and_log_and_seeds(tmp_path, restore_loggers):
    cfg = get_config("dino_r18_digits.py")
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.seed = 7
    args = argparse.Namespace(config_file=get_config_file("dino_r18_digits.py"), eval_only=False)
    default_setup(cfg, args)
    assert torch.initial_seed() == 7
    saved = LazyConfig.load(str(tmp_path / "out" / "config.yaml"))
    assert saved.model.transformer.embed_dim == 128
    assert saved.train.output_dir == str(tmp_path / "out")
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "Environment info" in log and "dino_r18_digits.py" in log


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
