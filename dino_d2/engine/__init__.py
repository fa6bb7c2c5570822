"""Training: optimizer parameter groups, a trainer with gradient clipping and mixed precision on
any device, a model EMA, the training step built once from a config (``train`` read into typed
options), the job setup the training script uses, and a CPU-capable launcher in which one
failing process stops the whole job."""

from .defaults import default_setup, resolve_device
from .ema import EMAHook, ModelEMA
from .hooks import EvalHook
from .launch import DEFAULT_TIMEOUT, JobFailedError, launch
from .lr_decay import ViTLayerDecay
from .optimizer import get_optimizer_params
from .output_dir import OutputDirConflictError, prepare_output_dir
from .train_keys import check_train_keys, declare_train_keys, known_train_keys
from .train_options import TrainOptions
from .training import Training, build_training
from .trainer import (
    Trainer,
    amp_settings,
    bfloat16_is_native,
    check_losses_finite,
    describe_precision,
)
from .writers import JSONWriter, default_writers

__all__ = [
    "get_optimizer_params",
    "ViTLayerDecay",
    "Trainer",
    "amp_settings",
    "bfloat16_is_native",
    "describe_precision",
    "check_losses_finite",
    "ModelEMA",
    "EMAHook",
    "default_setup",
    "resolve_device",
    "TrainOptions",
    "Training",
    "build_training",
    "declare_train_keys",
    "known_train_keys",
    "check_train_keys",
    "EvalHook",
    "launch",
    "DEFAULT_TIMEOUT",
    "JobFailedError",
    "OutputDirConflictError",
    "prepare_output_dir",
    "JSONWriter",
    "default_writers",
]
