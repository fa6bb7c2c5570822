"""The CPU fast path against the plain model, with frozen batch norms that folding changes."""

import pytest
import torch

from detectron2.config import instantiate
from detectron2.layers import FrozenBatchNorm2d

from dino_d2.measure import (
    fast_path_parity,
    full_float32,
    perturb_frozen_batchnorm,
    random_batches,
)


def test_frozen_batchnorm_made_non_trivial_and_fast_path_equal(tiny_dino_config):
    cfg = tiny_dino_config()
    model = instantiate(cfg.model).eval()
    assert perturb_frozen_batchnorm(model, seed=1) > 0
    norm = next(m for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    batch = random_batches(1, 2, 96, 80)[0]
    comparison = fast_path_parity(model, batch)
    assert comparison.passed and comparison.num_paired == 2 * cfg.model.num_select
    assert comparison.max_score_diff <= 1e-4


def test_full_float32_turns_tf32_off_and_restores_it_even_on_error():
    """The parity's CUDA convolutions and products in full float32 (the fast path was seen to
    fail its 1e-4 score tolerance on an H200 under cuDNN's default TF32)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = True, True
        with pytest.raises(KeyError):
            with full_float32():
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
                raise KeyError("inside")
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
