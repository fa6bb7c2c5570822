"""Exponential moving average (EMA) of a model's weights, checkpointed with the model.

After every optimizer step, each floating-point entry of the model's ``state_dict`` (parameters
and buffers such as BatchNorm statistics, as the DINO authors' ``ModelEma`` does) is averaged::

    ema = decay * ema + (1 - decay) * value

and every other entry (integer counters) is copied. The average lives in a :class:`ModelEMA`,
which Detectron2's ``DetectionCheckpointer`` saves and loads as an extra checkpointable
(``DetectionCheckpointer(model, save_dir, ema=model_ema)`` puts it under the checkpoint's
``"ema"`` key), so ``--resume`` continues the average. :class:`EMAHook` updates it in
Detectron2's training loop; :meth:`ModelEMA.applied_to` evaluates the model with the averaged
weights.
"""

import contextlib
import logging
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterator

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["ModelEMA", "EMAHook"]

logger = logging.getLogger(__name__)


class ModelEMA:
    """The moving average of one model's ``state_dict``, on the model's devices.

    Args:
        model: the model (not a DistributedDataParallel wrapper); the average starts as a copy
            of its current weights.
        decay: weight of the old average in each update, in [0, 1).

    Attributes:
        num_updates: the number of :meth:`update` calls since the average was (re)started.
        restored: True once :meth:`load_state_dict` has filled the average from a checkpoint.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.state = OrderedDict(
            (name, value.detach().clone()) for name, value in model.state_dict().items()
        )
        self.num_updates = 0
        self.restored = False

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restarts the average from the model's current weights."""
        for name, value in self._matching(model).items():
            self.state[name].copy_(value)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards the model's current weights (call after each step).

        The floating-point entries are updated together, grouped by device and dtype, with one
        multi-tensor linear interpolation (``ema + (1 - decay) * (value - ema)``, one pass over
        the memory) instead of one tensor at a time.
        """
        averages, values = defaultdict(list), defaultdict(list)
        for name, value in self._matching(model).items():
            average = self.state[name]
            if average.is_floating_point():
                key = (average.device, average.dtype)
                averages[key].append(average)
                values[key].append(value.detach().to(average.dtype))
            else:
                average.copy_(value)
        for key, group in averages.items():
            torch._foreach_lerp_(group, values[key], 1.0 - self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily loads the averaged weights into ``model`` (e.g. to evaluate it).

        The model's own weights are put back on exit, also when the body raises.
        """
        backup = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> Dict[str, Any]:
        """``{"model": averaged state_dict, "decay": float, "num_updates": int}``.

        ``["model"]`` can be loaded into the model like any of its state_dicts.
        """
        return {"model": self.state, "decay": self.decay, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores the average (copied onto the current devices) and the update count.

        The decay stays the one given to the constructor (the config's).
        """
        saved = state_dict["model"]
        missing = sorted(set(self.state) - set(saved))
        unexpected = sorted(set(saved) - set(self.state))
        if missing or unexpected:
            raise KeyError(
                f"the checkpoint's EMA does not match the model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
        for name, average in self.state.items():
            if saved[name].shape != average.shape:
                raise ValueError(
                    f"the checkpoint's EMA of {name} has shape {tuple(saved[name].shape)}, "
                    f"the model's {tuple(average.shape)}"
                )
            average.copy_(saved[name])
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.restored = True

    def _matching(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        current = model.state_dict()
        if current.keys() != self.state.keys():
            raise KeyError("ModelEMA: the model's state_dict keys changed since the EMA was built")
        return current


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every training step.

    Before training, an average that was not restored from a checkpoint is restarted from the
    model's weights as they are then (after ``train.init_checkpoint`` was loaded). Register it
    before the checkpointer and the evaluation hooks, so they see this step's average.

    Args:
        ema: the average.
        model: the model being trained (not a DistributedDataParallel wrapper).
    """

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def before_train(self):
        if self.ema.restored:
            logger.info(f"EMA restored from the checkpoint ({self.ema.num_updates} updates)")
        else:
            self.ema.reset(self.model)
            logger.info(f"EMA started from the model's weights (decay {self.ema.decay})")

    def after_step(self):
        self.ema.update(self.model)
