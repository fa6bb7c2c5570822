"""Training: optimizer parameter groups, a trainer with gradient clipping and mixed precision on
any device, a model EMA, the training step built once from a config (``train`` read into typed
options), the job setup the training script uses, and a CPU-capable launcher in which one
failing process stops the whole job.

Only :mod:`~dino_d2.engine.defaults` is imported with the package (an inference process needs
``resolve_device``); the training parts are imported on first access of their names, so that
``dino_d2.engine.predictor`` does not pull in Detectron2's trainer, hooks and evaluation."""

from ..utils.lazy import lazy_exports
from .defaults import default_setup, resolve_device

__all__ = [
    "get_optimizer_params",
    "ViTLayerDecay",
    "Trainer",
    "amp_settings",
    "bfloat16_is_native",
    "describe_precision",
    "inference_autocast",
    "inference_dtype",
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

__getattr__ = lazy_exports(
    __name__,
    {
        "EMAHook": ".ema",
        "ModelEMA": ".ema",
        "EvalHook": ".hooks",
        "DEFAULT_TIMEOUT": ".launch",
        "JobFailedError": ".launch",
        "launch": ".launch",
        "ViTLayerDecay": ".lr_decay",
        "get_optimizer_params": ".optimizer",
        "OutputDirConflictError": ".output_dir",
        "prepare_output_dir": ".output_dir",
        "check_train_keys": ".train_keys",
        "declare_train_keys": ".train_keys",
        "known_train_keys": ".train_keys",
        "TrainOptions": ".train_options",
        "Training": ".training",
        "build_training": ".training",
        "Trainer": ".trainer",
        "amp_settings": ".precision",
        "bfloat16_is_native": ".precision",
        "inference_autocast": ".precision",
        "inference_dtype": ".precision",
        "check_losses_finite": ".trainer",
        "describe_precision": ".trainer",
        "JSONWriter": ".writers",
        "default_writers": ".writers",
    },
)
