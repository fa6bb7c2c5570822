"""The training step of a config, built once: what the training script runs and the benchmark times.

:func:`build_training` wires what one training iteration needs, from the config:

* the model (built from ``cfg.model`` unless given), with the training transform of
  :func:`dino_d2.layers.fast_path.optimize_for_training` (folded frozen batch norms, a
  channels-last backbone: the same parameters and checkpoints, faster);
* the optimizer (``cfg.optimizer``), the model wrapped for a distributed job (``train.ddp``);
* a :class:`~dino_d2.engine.trainer.Trainer` with the config's gradient clipping
  (``train.clip_grad``) and mixed precision (``train.amp``);
* the hooks that are part of every step: Detectron2's iteration timer and learning-rate
  schedule (``cfg.lr_multiplier``), the compute threads that follow the free cores (on the
  CPU) and the weight average (``train.model_ema``).

``tools/lazyconfig_train_net.py`` adds the hooks of a job (checkpoints, evaluation, metric
files) and runs Detectron2's loop; ``tools/benchmark.py`` runs the same iterations one at a
time with :meth:`Training.steps` on a batch it repeats.
"""

import contextlib
import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from detectron2.config import instantiate
from detectron2.engine import hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils.events import EventStorage

from ..layers.fast_path import optimize_for_training
from .ema import EMAHook, ModelEMA
from .threads import AdaptiveThreadsHook
from .train_options import TrainOptions
from .precision import amp_settings
from .trainer import Trainer

__all__ = ["Training", "build_training"]


@dataclasses.dataclass
class Training:
    """The parts of a training, as :func:`build_training` wires them.

    Attributes:
        model: the model being trained (not a DistributedDataParallel wrapper), in training
            mode on its device.
        trainer: the trainer, with the hooks of every step registered.
        ema: the weight average, or None when ``train.model_ema`` is off.
        options: the config's ``train`` options.
    """

    model: nn.Module
    trainer: Trainer
    ema: Optional[ModelEMA]
    options: TrainOptions

    @contextlib.contextmanager
    def steps(self, start_iter: int = 0) -> Iterator[Callable[[], None]]:
        """Detectron2's training loop (``TrainerBase.train``), one iteration per call.

        On entering, an ``EventStorage`` becomes the trainer's and the hooks' ``before_train``
        run; each call of the yielded function runs one iteration (``before_step``, the step,
        ``after_step``); on leaving, also after an error, ``after_train`` runs. The
        learning-rate schedule spans ``train.max_iter`` iterations.

        Raises:
            ValueError: a call after ``train.max_iter`` iterations (the schedule ends there).
        """
        trainer, max_iter = self.trainer, self.options.max_iter
        trainer.iter = trainer.start_iter = start_iter
        trainer.max_iter = max_iter

        def step():
            if trainer.iter >= max_iter:
                raise ValueError(
                    f"train.max_iter={max_iter} iterations are done: the learning-rate schedule "
                    "ends there; set a larger train.max_iter"
                )
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            trainer.iter += 1

        with EventStorage(start_iter) as trainer.storage:
            try:
                trainer.before_train()
                yield step
            finally:
                trainer.after_train()


def build_training(
    cfg, device, *, model: Optional[nn.Module] = None, data_loader: Optional[Iterable] = None
) -> Training:
    """Builds the training of ``cfg`` on ``device`` (see the module docstring).

    Args:
        cfg: a dino_d2 LazyConfig (``model``, ``optimizer``, ``lr_multiplier``, ``train`` and,
            without ``data_loader``, ``dataloader.train`` are read).
        device: where the model lives ("cpu", "cuda", a ``torch.device``).
        model: the model to train, already on ``device``; None builds ``cfg.model``. It is
            transformed in place (:func:`dino_d2.layers.fast_path.optimize_for_training`).
        data_loader: the batches to train on (lists of Detectron2 dicts); None builds
            ``cfg.dataloader.train``.

    Returns:
        the :class:`Training`; its trainer runs with Detectron2's ``train(start, max_iter)``
        or with :meth:`Training.steps`.
    """
    device = torch.device(device)
    options = TrainOptions.from_config(cfg.train)
    if model is None:
        model = instantiate(cfg.model).to(device)
    optimize_for_training(model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    if data_loader is None:
        data_loader = instantiate(cfg.dataloader.train)
    ema = ModelEMA(model, decay=options.model_ema.decay) if options.model_ema.enabled else None
    ddp_kwargs = dict(options.ddp)
    if device.type != "cuda":
        ddp_kwargs["device_ids"] = None
    amp_dtype, grad_scaler = None, None
    if options.amp.enabled:
        amp_dtype, grad_scaler = amp_settings(device, options.amp.precision)
    clip = options.clip_grad
    trainer = Trainer(
        create_ddp_model(model, **ddp_kwargs),
        data_loader,
        optimizer,
        clip_grad_max_norm=clip.max_norm if clip.enabled else None,
        clip_grad_norm_type=clip.norm_type,
        amp_dtype=amp_dtype,
        grad_scaler=grad_scaler,
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            # On the CPU, the compute threads follow the cores other processes leave free.
            AdaptiveThreadsHook() if device.type == "cpu" else None,
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # Before a job's checkpointer and evaluation: both see this step's average.
            EMAHook(ema, model) if ema is not None else None,
        ]
    )
    return Training(model=model, trainer=trainer, ema=ema, options=options)
