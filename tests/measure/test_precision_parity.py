"""dino_d2.measure.precision_parity: float32 against bfloat16 autocast, detections paired."""

import torch

from detectron2.config import instantiate

from dino_d2.measure.parity import perturb_frozen_batchnorm
from dino_d2.measure.precision_parity import autocast_parity

__all__ = []


def _model_and_batch(tiny_dino_config):
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config().model).eval()
    perturb_frozen_batchnorm(model)
    generator = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(256, (3, 64, 96), generator=generator).float()}]
    return model, batch


def test_float32_against_itself_is_exact(tiny_dino_config):
    model, batch = _model_and_batch(tiny_dino_config)
    comparison = autocast_parity(model, batch, None)
    assert comparison.passed
    assert comparison.max_score_diff == 0 and comparison.max_box_diff == 0


def test_bfloat16_differs_by_its_rounding_and_leaves_the_model_alone(tiny_dino_config):
    model, batch = _model_and_batch(tiny_dino_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    comparison = autocast_parity(model, batch, torch.bfloat16)
    # It ran in bfloat16 (scores moved) and stayed close (a bf16 rounding of sigmoid scores is
    # at most 2^-8; paired detections of tied proposals may move more, not beyond a score).
    assert 0 < comparison.max_score_diff <= 1.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
