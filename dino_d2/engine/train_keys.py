"""A check of the keys under ``train``: a mistyped override is reported, not silently ignored.

``train`` is a free-form dict in LazyConfigs (Detectron2 has no schema for it), so
``train.max_itr=5`` on the command line adds a key that nothing reads, and training runs the
config's ``max_iter``. :func:`check_train_keys` warns about every key under ``train`` that is not
read by the training script (:data:`SCRIPT_TRAIN_KEYS`) or by the Detectron2 parts it hands a
whole sub-dict to (``train.ddp`` goes to ``DistributedDataParallel``, ``train.checkpointer`` to
``PeriodicCheckpointer``), and suggests the nearest known key.

Keys read by your own code (a hook of your own training script, say) are declared once, at
import time of the module that reads them::

    from dino_d2.engine import declare_train_keys

    declare_train_keys("my_hook.period", "my_hook.enabled")   # or "my_hook": the whole sub-dict

A declared key covers the keys below it; keys may be given with or without the ``train.``
prefix.
"""

import difflib
import inspect
import logging
from typing import Callable, Dict, Iterable, List, Set

from omegaconf import DictConfig, OmegaConf

__all__ = ["SCRIPT_TRAIN_KEYS", "declare_train_keys", "known_train_keys", "check_train_keys"]

logger = logging.getLogger(__name__)

# What tools/lazyconfig_train_net.py and dino_d2.engine.default_setup read (configs/common/train.py).
SCRIPT_TRAIN_KEYS = (
    "output_dir",
    "init_checkpoint",
    "init_class_map",
    "max_iter",
    "amp.enabled",
    "amp.precision",
    "ddp.fp16_compression",
    "clip_grad.enabled",
    "clip_grad.max_norm",
    "clip_grad.norm_type",
    "model_ema.enabled",
    "model_ema.decay",
    "model_ema.use_for_eval",
    "eval_period",
    "log_period",
    "seed",
    "device",
    "cudnn_benchmark",
)

_DECLARED: Set[str] = set()


def _strip(key: str) -> str:
    key = key.strip()
    return key[len("train.") :] if key.startswith("train.") else key


def declare_train_keys(*keys: str) -> None:
    """Declares keys under ``train`` that your own code reads (see the module docstring).

    Args:
        keys: dotted keys below ``train`` (``"my_hook.period"``); a key covers its sub-keys.
    """
    for key in keys:
        if not isinstance(key, str) or not _strip(key):
            raise ValueError(f"declare_train_keys takes dotted key names, got {key!r}")
        _DECLARED.add(_strip(key))


def _parameters(function: Callable, skip: Iterable[str]) -> List[str]:
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        names.append(name)
    return names


def _handed_over_keys() -> List[str]:
    """The keyword arguments of what the script passes ``train.ddp`` / ``train.checkpointer`` to."""
    from detectron2.engine.hooks import PeriodicCheckpointer
    from torch.nn.parallel import DistributedDataParallel

    ddp = _parameters(DistributedDataParallel.__init__, ("self", "module"))
    checkpointer = _parameters(PeriodicCheckpointer.__init__, ("self", "checkpointer"))
    return [f"ddp.{name}" for name in ddp] + [f"checkpointer.{name}" for name in checkpointer]


def known_train_keys() -> Set[str]:
    """The keys under ``train`` that are read: the script's, Detectron2's and the declared."""
    return set(SCRIPT_TRAIN_KEYS) | set(_handed_over_keys()) | _DECLARED


def _leaves(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict) and node:
        leaves = {}
        for key, value in node.items():
            leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return leaves
    return {prefix: node}


def check_train_keys(train: DictConfig) -> List[str]:
    """Warns about each key under ``train`` that nothing reads, with the nearest known key.

    Args:
        train: the config's ``train`` node, overrides applied.

    Returns:
        the unknown keys (dotted, below ``train``), in the config's order.
    """
    known = known_train_keys()
    declared = tuple(_DECLARED)
    container = (
        OmegaConf.to_container(train, resolve=False) if OmegaConf.is_config(train) else train
    )
    unknown = []
    for key, value in _leaves(container).items():
        if key in known or any(key == d or key.startswith(d + ".") for d in declared):
            continue
        if value == {} and any(k.startswith(key + ".") for k in known):
            continue  # an empty sub-dict of known keys
        unknown.append(key)
        nearest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        suggestion = f"did you mean train.{nearest[0]}? " if nearest else ""
        logger.warning(
            f"train.{key}={value!r} is not read by the training script or by Detectron2's hooks: "
            f"{suggestion}(Keys that your own hooks read can be declared with "
            "dino_d2.engine.declare_train_keys.)"
        )
    return unknown
