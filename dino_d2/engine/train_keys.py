"""A check of the keys under ``train``: a mistyped override is reported, not silently ignored.

``train`` is a free-form dict in LazyConfigs (Detectron2 has no schema for it), so
``train.max_itr=5`` on the command line adds a key that nothing reads, and training runs the
config's ``max_iter``. :func:`check_train_keys` warns about every key under ``train`` that is not
read by the training (the fields of :class:`dino_d2.engine.train_options.TrainOptions`, through
which the script reads ``train``) or by the parts it hands a whole sub-dict to (``train.ddp``
goes to Detectron2's ``create_ddp_model`` and ``DistributedDataParallel``,
``train.checkpointer`` to ``PeriodicCheckpointer``), and suggests the nearest known key.

Keys read by your own code (a hook of your own training script, say) are declared once, at
import time of the module that reads them::

    from dino_d2.engine import declare_train_keys

    declare_train_keys("my_hook.period", "my_hook.enabled")   # or "my_hook": the whole sub-dict

A declared key covers the keys below it; keys may be given with or without the ``train.``
prefix.
"""

import difflib
import logging
from typing import Dict, List, Set

from omegaconf import DictConfig, OmegaConf

from .train_options import TrainOptions, option_keys

__all__ = ["declare_train_keys", "known_train_keys", "check_train_keys"]

logger = logging.getLogger(__name__)

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


def known_train_keys(options: type = TrainOptions) -> Set[str]:
    """The keys under ``train`` that are read: the fields of ``options`` (default
    :class:`TrainOptions`, what dino_d2's training reads; see
    :func:`dino_d2.engine.train_options.option_keys`) and the declared keys."""
    return set(option_keys(options)) | _DECLARED


def _leaves(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict) and node:
        leaves = {}
        for key, value in node.items():
            leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return leaves
    return {prefix: node}


def check_train_keys(train: DictConfig, options: type = TrainOptions) -> List[str]:
    """Warns about each key under ``train`` that nothing reads, with the nearest known key.

    Args:
        train: the config's ``train`` node, overrides applied.
        options: the dataclass the training reads ``train`` into (default
            :class:`TrainOptions`).

    Returns:
        the unknown keys (dotted, below ``train``), in the config's order.
    """
    known = known_train_keys(options)
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
