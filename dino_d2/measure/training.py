"""Training-step time of a config, on this machine as it is and with other processes keeping
cores busy.

The iterations timed are the training script's: a :class:`dino_d2.engine.Training` that
:func:`dino_d2.engine.build_training` built (on a data loader that repeats one batch, say), run
one at a time by :meth:`~dino_d2.engine.Training.steps`. :func:`time_training` times them;
:func:`time_training_idle_and_busy` times them in alternating blocks, idle and with
:func:`dino_d2.measure.busy.busy_cpu` running.
"""

import logging
import statistics
import time
from typing import Callable, Dict

from ..engine.training import Training
from ..utils.cpus import CpuLoadMonitor
from .busy import busy_cpu
from .memory import cuda_peak_mb
from .timing import timed_loop

__all__ = ["time_training", "time_training_idle_and_busy"]

logger = logging.getLogger(__name__)


def _counted(step: Callable[[], None]) -> Callable[[], int]:
    """``step`` as :func:`~dino_d2.measure.timing.timed_loop` takes it: one unit per call."""

    def counted():
        step()
        return 1

    return counted


def time_training(training: Training, num_iter: int, warmup: int) -> Dict:
    """Times ``warmup + num_iter`` iterations of ``training``; the first ``warmup`` are not timed.

    Each is an iteration of the training script (:meth:`dino_d2.engine.Training.steps`: the
    step and its hooks: learning rate, EMA, compute threads).

    Returns:
        ``step_s_median`` / ``_mean`` / ``_min`` (seconds per step), ``threads`` (the compute
        threads of each timed step), ``total_loss`` (of the last step, a sanity figure: it
        must be finite) and ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(training.model.parameters()).device
    with training.steps() as step:
        seconds, threads = timed_loop(device, _counted(step), num_iter, warmup, "step")
        total_loss = training.trainer.storage.history("total_loss").latest()
    return {
        "step_s_median": statistics.median(seconds),
        "step_s_mean": statistics.fmean(seconds),
        "step_s_min": min(seconds),
        "threads": threads,
        "total_loss": total_loss,
        "cuda_max_memory_allocated_mb": cuda_peak_mb(device),
    }


def _settle(step: Callable[[], int], seconds: float) -> int:
    """Runs untimed steps for at least ``seconds``; returns how many."""
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count


def time_training_idle_and_busy(
    training: Training,
    num_rounds: int,
    warmup: int,
    *,
    block: int = 3,
    busy_processes: int = 1,
    settle_s: float = 5.0,
) -> Dict:
    """Times training steps on this machine as it is, and with ``busy_processes`` cores kept busy.

    Idle and busy blocks alternate (idle, busy, idle, busy, ...), so that a drift of the
    machine's speed affects both alike; the busy processes run during the busy blocks only
    (:func:`busy_cpu`). Each block first runs untimed steps for ``settle_s`` seconds, so that
    the thread count has followed the change (:class:`AdaptiveThreads` steps down within about
    a second and back up after about three), then times ``block`` steps.

    Returns:
        ``step_s_median`` / ``_min`` and ``threads`` of the idle steps, ``busy_step_s_median``
        / ``_min`` and ``busy_threads`` of the busy ones, ``busy_ratio`` (busy median / idle
        median), ``busy_ratio_per_round`` (the same ratio for each pair of blocks, to show the
        spread), ``busy_processes``, ``settle_steps`` (untimed steps, in total),
        ``others_cpus_idle`` / ``_busy`` (for each timed block, the CPUs that other processes
        used meanwhile, the busy ones included; None without ``/proc/stat``: an "idle" block
        with other load was not idle), ``total_loss`` (of the last step) and
        ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(training.model.parameters()).device
    idle, idle_threads, busy, busy_threads, rounds = [], [], [], [], []
    others = {"idle": [], "busy": []}
    monitor = CpuLoadMonitor()
    settle_steps = 0

    def timed_block(kind):
        monitor.sample()
        seconds, threads = timed_loop(device, step, block, 0, "step")
        load = monitor.sample()
        others[kind].append(None if load is None else round(load[1], 2))
        return seconds, threads

    with training.steps() as one_step:
        step = _counted(one_step)
        timed_loop(device, step, 0, warmup, "step")
        for index in range(num_rounds):
            logger.info(f"round {index + 1}/{num_rounds}: idle")
            settle_steps += _settle(step, settle_s)
            idle_block, threads = timed_block("idle")
            idle += idle_block
            idle_threads += threads
            logger.info(f"round {index + 1}/{num_rounds}: {busy_processes} busy process(es)")
            with busy_cpu(busy_processes):
                settle_steps += _settle(step, settle_s)
                busy_block, threads = timed_block("busy")
            busy += busy_block
            busy_threads += threads
            rounds.append(statistics.median(busy_block) / statistics.median(idle_block))
        total_loss = training.trainer.storage.history("total_loss").latest()
    return {
        "step_s_median": statistics.median(idle),
        "step_s_min": min(idle),
        "threads": idle_threads,
        "busy_step_s_median": statistics.median(busy),
        "busy_step_s_min": min(busy),
        "busy_threads": busy_threads,
        "busy_ratio": statistics.median(busy) / statistics.median(idle),
        "busy_ratio_per_round": rounds,
        "busy_processes": busy_processes,
        "settle_steps": settle_steps,
        "others_cpus_idle": others["idle"],
        "others_cpus_busy": others["busy"],
        "total_loss": total_loss,
        "cuda_max_memory_allocated_mb": cuda_peak_mb(device),
    }
