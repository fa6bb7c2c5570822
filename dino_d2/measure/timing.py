"""Inference latency of a model and of an exported graph, on the wall clock.

:func:`timed_loop` runs a step repeatedly and times each run after synchronizing CUDA, so that
the time covers the work and not only its launch; :func:`time_inference` and
:func:`time_exported` time a model in eval mode and an exported graph with it, per image.
"""

import logging
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .memory import cuda_peak_mb

__all__ = ["synchronize", "timed_loop", "time_inference", "time_exported"]

logger = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(
    device: torch.device, step: Callable[[], int], num_steps: int, warmup: int, unit: str
) -> Tuple[List[float], List[int]]:
    """Runs ``step()`` (returning its number of units) ``warmup + num_steps`` times.

    Returns the seconds per unit and the compute threads of each timed step; resets CUDA's peak
    memory after the warm-up.
    """
    seconds, threads = [], []
    for index in range(warmup + num_steps):
        if index == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        num_threads = torch.get_num_threads()
        synchronize(device)
        start = time.perf_counter()
        units = step()
        synchronize(device)
        elapsed = (time.perf_counter() - start) / units
        if index >= warmup:
            seconds.append(elapsed)
            threads.append(num_threads)
            label = f"iteration {index - warmup + 1}/{num_steps}"
        else:
            label = f"warm-up {index + 1}/{warmup}"
        logger.info(f"{label}: {1000 * elapsed:.1f} ms/{unit} ({num_threads} threads)")
    return seconds, threads


def time_inference(
    model, batches: Sequence[List[Dict]], warmup: int, *, amp_dtype: Optional[torch.dtype] = None
) -> Dict:
    """Runs ``model`` on every batch without gradients; times all but the first ``warmup``.

    Args:
        model: a Detectron2 model in eval mode.
        batches: lists of model inputs (dicts with ``image``).
        warmup: number of leading batches not timed.
        amp_dtype: run under ``torch.autocast`` to this dtype; None: full precision.

    Returns:
        ``latency_ms_median`` / ``_mean`` / ``_min`` per image (a batch's time divided by its
        size), ``images_per_s`` and ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(model.parameters()).device

    batch_iter = iter(batches)

    def step():
        batch = next(batch_iter)
        model(batch)
        return len(batch)

    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with torch.no_grad(), autocast:
        seconds, _ = timed_loop(device, step, len(batches) - warmup, warmup, "image")
    return {**_latency_summary(seconds), "cuda_max_memory_allocated_mb": cuda_peak_mb(device)}


def _latency_summary(seconds: Sequence[float]) -> Dict:
    per_image_ms = [1000 * s for s in seconds]
    return {
        "latency_ms_median": statistics.median(per_image_ms),
        "latency_ms_mean": statistics.fmean(per_image_ms),
        "latency_ms_min": min(per_image_ms),
        "images_per_s": 1000 / statistics.fmean(per_image_ms),
    }


def time_exported(
    run: Callable[[Tensor, Tensor], Sequence],
    batches: Sequence[Tuple[Tensor, Tensor]],
    warmup: int,
) -> Dict:
    """Times an exported graph (:func:`dino_d2.export.exporter.load_exported`) like
    :func:`time_inference` times the model: on every ``(images, image_sizes)`` batch, all but
    the first ``warmup`` timed.

    Returns:
        ``latency_ms_median`` / ``_mean`` / ``_min`` per image and ``images_per_s``.
    """
    batch_iter = iter(batches)

    def step():
        images, image_sizes = next(batch_iter)
        run(images, image_sizes)
        return len(images)

    seconds, _ = timed_loop(torch.device("cpu"), step, len(batches) - warmup, warmup, "image")
    return _latency_summary(seconds)
