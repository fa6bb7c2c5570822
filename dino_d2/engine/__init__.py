"""Training: optimizer parameter groups, a trainer with gradient clipping and mixed precision on
any device, a model EMA, and the job setup the training script uses. The CPU-capable launcher is
:func:`dino_d2._compat.launch`."""

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
from .optimizer import get_optimizer_params
from .trainer import Trainer, amp_settings, check_losses_finite

__all__ = [
    "get_optimizer_params",
    "Trainer",
    "amp_settings",
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
]
