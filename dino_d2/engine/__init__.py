"""Training: optimizer parameter groups, a trainer with gradient clipping and mixed precision on
any device, a model EMA, the job setup the training script uses, and a CPU-capable launcher in
which one failing process stops the whole job."""

from .defaults import (
    CUSTOM_TEST_DATASET,
    CUSTOM_TRAIN_DATASET,
    DATASET_OVERRIDE_KEYS,
    apply_dataset_overrides,
    check_num_classes,
    config_dataset_names,
    default_setup,
    pop_dataset_overrides,
    register_config_datasets,
    resolve_device,
)
from .ema import EMAHook, ModelEMA
from .hooks import EvalHook
from .launch import DEFAULT_TIMEOUT, JobFailedError, launch
from .lr_decay import ViTLayerDecay
from .optimizer import get_optimizer_params
from .output_dir import OutputDirConflictError, prepare_output_dir
from .train_keys import SCRIPT_TRAIN_KEYS, check_train_keys, declare_train_keys, known_train_keys
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
    "DATASET_OVERRIDE_KEYS",
    "CUSTOM_TRAIN_DATASET",
    "CUSTOM_TEST_DATASET",
    "pop_dataset_overrides",
    "apply_dataset_overrides",
    "config_dataset_names",
    "register_config_datasets",
    "check_num_classes",
    "SCRIPT_TRAIN_KEYS",
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
