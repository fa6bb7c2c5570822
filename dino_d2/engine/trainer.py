"""Detectron2's training loop with full-model gradient clipping and mixed precision on any device.

Detectron2's ``AMPTrainer`` requires CUDA (both in v0.6 and in main) and neither of its trainers
clips gradients. :class:`Trainer` is a ``SimpleTrainer`` whose step is::

    forward (under autocast when mixed precision is on)
    zero_grad, backward (of the scaled loss when a GradScaler is used)
    after_backward hooks (Detectron2 main only)
    unscale the gradients (GradScaler only), clip the norm of all gradients together
    copy the loss terms and the gradient norm to the host, all in one transfer
    stop with a FloatingPointError naming the iteration and the terms if any loss is NaN or inf
    write metrics, optimizer step (through the GradScaler, which skips non-finite steps), update

Everything else (hooks, metrics, checkpointable state) is Detectron2's.

The loss terms and the gradient norm reach the host as one stacked tensor: on a GPU the step
waits for the device once, not once per loss term (Detectron2's ``_write_metrics`` calls
``.item()`` on each of DINO's ~40 terms), and the metrics are then written from host values.

A non-finite loss stops training before the optimizer step: no weight, optimizer state or EMA
update sees it, and since Detectron2's ``PeriodicCheckpointer`` saves in ``after_step`` (which a
failed step never reaches), the checkpoints on disk are the last good ones. Detectron2's own
check (in ``_write_metrics``) gives the iteration and every loss value but does not say which
terms are non-finite.
"""

import math
import time
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from .._compat import run_after_backward_hooks
from .defaults import resolve_device
from .precision import amp_settings, bfloat16_is_native

__all__ = [
    "Trainer",
    "check_losses_finite",
    "describe_precision",
]


def describe_precision(device, amp_dtype: Optional[torch.dtype], grad_scaler=None) -> str:
    """One log line naming the precision training runs in on ``device`` and why."""
    device = torch.device(device)
    if amp_dtype is not None:
        scaler = ", with a GradScaler" if grad_scaler is not None else ""
        return f"Mixed precision: autocast to {amp_dtype} on {device.type}{scaler}"
    if device.type == "cpu":
        reason = "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)"
    else:
        reason = f"{device} does not compute bfloat16 natively"
    return f"float32: {reason} (train.amp.precision=bfloat16 forces bfloat16 autocast)"


def _stacked_to_host(scalars: List[torch.Tensor]) -> torch.Tensor:
    """The scalar tensors as one float32 CPU tensor, copied from their device in one transfer."""
    if not scalars:
        return torch.zeros(0)
    return torch.stack([s.detach().reshape(()).float() for s in scalars]).cpu()


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raises ``FloatingPointError`` naming ``iteration`` and the NaN / inf terms of ``loss_dict``.

    Args:
        loss_dict: the model's losses (scalar tensors, read from their device in one transfer).
        iteration: the training iteration they belong to.
    """
    values = dict(zip(loss_dict, _stacked_to_host(list(loss_dict.values())).tolist()))
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    terms = ", ".join(f"{name}={value}" for name, value in bad.items())
    finite = ", ".join(f"{name}={value:.4g}" for name, value in values.items() if name not in bad)
    raise FloatingPointError(
        f"Loss became infinite or NaN at iteration {iteration}: {terms} "
        f"(finite terms: {finite or 'none'}). Training stopped before this step's update; "
        "the last checkpoint is from an earlier iteration. Try a lower optimizer.lr, "
        "train.clip_grad, or check the data (boxes) of this iteration."
    )


class Trainer(SimpleTrainer):
    """``SimpleTrainer`` plus gradient clipping and optional mixed precision (see module doc).

    Args:
        model, data_loader, optimizer: as for Detectron2's ``SimpleTrainer``.
        clip_grad_max_norm: clip the total norm of all gradients to this; None disables clipping.
        clip_grad_norm_type: the norm's order (2.0, or ``inf`` for the largest absolute value).
        amp_dtype: autocast dtype of the forward pass (float16 or bfloat16); None: full precision.
        grad_scaler: a ``torch.amp.GradScaler`` to scale the loss (float16 only); with
            clipping, the gradients are unscaled before their norm is taken. Its state is part
            of the trainer's checkpointed state, as with Detectron2's ``AMPTrainer``.

    The total gradient norm before clipping is logged as ``grad_norm``. A NaN or infinite loss
    raises ``FloatingPointError`` (see :func:`check_losses_finite`) before the optimizer step.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        clip_grad_max_norm: Optional[float] = None,
        clip_grad_norm_type: float = 2.0,
        amp_dtype: Optional[torch.dtype] = None,
        grad_scaler=None,
    ):
        super().__init__(model, data_loader, optimizer)
        if clip_grad_max_norm is not None and not clip_grad_max_norm > 0:
            raise ValueError(f"clip_grad_max_norm must be positive, got {clip_grad_max_norm}")
        if grad_scaler is not None and amp_dtype is None:
            raise ValueError("a grad_scaler is only used with mixed precision (amp_dtype)")
        self.clip_grad_max_norm = clip_grad_max_norm
        self.clip_grad_norm_type = float(clip_grad_norm_type)
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self._device_type = next(model.parameters()).device.type

    def run_step(self):
        assert self.model.training, "[Trainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(
            self._device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        run_after_backward_hooks(self)

        total_norm = None
        if self.clip_grad_max_norm is not None:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            total_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.clip_grad_max_norm, self.clip_grad_norm_type
            )

        # The step's one wait for the device: every loss term and the gradient norm together.
        scalars = list(loss_dict.values()) + ([total_norm] if total_norm is not None else [])
        host = _stacked_to_host(scalars)
        loss_dict = dict(zip(loss_dict, host.unbind()))
        check_losses_finite(loss_dict, self.iter)
        if total_norm is not None:
            get_event_storage().put_scalar("grad_norm", host[-1].item())

        self._write_metrics(loss_dict, data_time)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
