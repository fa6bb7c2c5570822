"""dino_d2.engine.precision: evaluation and the demo run in train.amp.eval_precision."""

import numpy as np
import pytest
import torch

from dino_d2.engine import bfloat16_is_native, inference_autocast, inference_dtype
from dino_d2.engine.predictor import Predictor
from dino_d2.engine.train_options import TrainOptions

__all__ = []


def test_inference_dtype_reads_the_precisions_as_training_does():
    assert inference_dtype("cpu", "float32") is None
    assert inference_dtype("cpu", "bfloat16") == torch.bfloat16
    expected = torch.bfloat16 if bfloat16_is_native("cpu") else None
    assert inference_dtype("cpu", "auto") == expected


@pytest.mark.parametrize("bad", ["float16", "fp8", "half"])
def test_a_wrong_eval_precision_names_the_key(bad):
    with pytest.raises(ValueError, match=f"train.amp.eval_precision='{bad}'"):
        inference_dtype("cpu", bad)


def test_inference_autocast_turns_autocast_on_only_for_mixed_precision():
    with inference_autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


def test_eval_precision_is_a_train_amp_option():
    assert TrainOptions.from_config({}).amp.eval_precision == "auto"
    options = TrainOptions.from_config({"amp": {"eval_precision": "bfloat16"}})
    assert options.amp.eval_precision == "bfloat16"


def test_the_predictor_runs_in_the_config_s_eval_precision(tiny_dino_config):
    cfg = tiny_dino_config()
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    outputs = {}
    for precision in ("float32", "bfloat16"):
        cfg.train.amp.eval_precision = precision
        torch.manual_seed(0)
        predictor = Predictor(cfg, checkpoint="", device="cpu")
        assert predictor.dtype == (None if precision == "float32" else torch.bfloat16)
        outputs[precision] = predictor(image)
    full, low = outputs["float32"], outputs["bfloat16"]
    # Detections come out in float32 whatever the precision the layers ran in.
    assert low.scores.dtype == low.pred_boxes.tensor.dtype == torch.float32
    assert len(full) == len(low) > 0
    # Same weights, same image: bfloat16 moves each score by little (top-k order may differ).
    assert torch.allclose(full.scores.sort().values, low.scores.sort().values, atol=0.05)
