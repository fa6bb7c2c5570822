"""CPU compute threads that follow the cores this process actually gets.

PyTorch splits every parallel operation into equal parts, one per thread, and waits for the
last. When another process keeps one of the cores busy, the thread that shares that core runs
only part of the time, every operation waits for it, and the waiting threads spin: with two
threads on a two-core machine a training step took 3-6 times as long as with an idle machine,
while one thread took 1.6 times. So the number of threads is chosen at run time:

* at the start (when :class:`AdaptiveThreads` is made), PyTorch's thread count is capped at the
  CPUs this process may run on (:func:`default_num_threads`; its affinity mask and its cgroup's
  CPU quota, :func:`dino_d2.utils.cpus.available_cpus`);
* while it runs, :class:`AdaptiveThreads` measures how much of those CPUs other processes use
  (:class:`dino_d2.utils.cpus.CpuLoadMonitor`, this process's own threads excluded), and uses
  as many threads as there are cores left, at least one. It steps down at once when others take
  a core, and back up only after the cores stayed free for a while.
  :class:`AdaptiveThreadsHook` does this between the steps of Detectron2's training loop.

A thread count the user chose (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` or ``TORCH_NUM_THREADS``
in the environment) is kept as it is. Without ``/proc/stat`` (not Linux) the count stays at
:func:`default_num_threads`. ``torch.set_num_threads`` applies to the calling thread's
parallel regions, so the changes are made on the thread that runs the model.
"""

import logging
import os
from typing import Callable, Optional

import torch

from detectron2.engine import HookBase

from ..utils.cpus import CpuLoadMonitor, available_cpus

__all__ = [
    "THREAD_ENV_VARS",
    "threads_set_by_user",
    "default_num_threads",
    "AdaptiveThreads",
    "AdaptiveThreadsHook",
]

logger = logging.getLogger(__name__)

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")


def threads_set_by_user() -> Optional[str]:
    """The first of :data:`THREAD_ENV_VARS` set in the environment, as ``NAME=value``, or None."""
    for name in THREAD_ENV_VARS:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def default_num_threads() -> int:
    """PyTorch's thread count, capped at :func:`available_cpus` unless the user chose it."""
    if threads_set_by_user():
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), available_cpus()))


class AdaptiveThreads:
    """Sets PyTorch's thread count to the cores other processes leave free.

    Call :meth:`update` between units of work (training steps) on the thread that runs them.
    Every ``interval_s`` it samples :class:`CpuLoadMonitor` and computes
    ``round(cpus - others)`` clamped to ``1..max_threads``: fewer threads are set at once, more
    only once ``patience`` samples in a row asked for them.

    Args:
        max_threads: the most threads to use; None: :func:`default_num_threads`.
        cpus: the CPUs shared with the other processes; None: :func:`available_cpus`.
        interval_s: the shortest time between two samples.
        patience: samples in a row that must ask for more threads before they are used.
        monitor: the load monitor (tests pass their own).
        set_threads: sets the thread count (default ``torch.set_num_threads``).
    """

    def __init__(
        self,
        max_threads: Optional[int] = None,
        *,
        cpus: Optional[int] = None,
        interval_s: float = 1.0,
        patience: int = 3,
        monitor: Optional[CpuLoadMonitor] = None,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ):
        self.max_threads = max_threads or default_num_threads()
        self.cpus = cpus or available_cpus()
        self.interval_s = interval_s
        self.patience = patience
        self.monitor = monitor or CpuLoadMonitor()
        self._set_threads = set_threads
        self.threads = self.max_threads
        self._set_threads(self.threads)
        self._elapsed = 0.0
        self._busy = 0.0
        self._wants_more = 0
        self.others = 0.0

    @property
    def enabled(self) -> bool:
        """False when there is nothing to choose (one thread) or no load to measure."""
        return self.max_threads > 1 and self.monitor.available

    def update(self) -> int:
        """Samples the load if ``interval_s`` has passed, changes the thread count if needed.

        Returns:
            the thread count now in use.
        """
        if not self.enabled:
            return self.threads
        sample = self.monitor.sample()
        if sample is None:
            return self.threads
        elapsed, others = sample
        self._elapsed += elapsed
        self._busy += others * elapsed
        if self._elapsed < self.interval_s:
            return self.threads
        self.others = self._busy / self._elapsed
        self._elapsed = self._busy = 0.0
        wanted = min(self.max_threads, max(1, round(self.cpus - self.others)))
        if wanted > self.threads:
            self._wants_more += 1
            if self._wants_more < self.patience:
                return self.threads
        self._wants_more = 0
        if wanted != self.threads:
            logger.info(
                f"Other processes use {self.others:.1f} of {self.cpus} CPUs: "
                f"{wanted} compute thread(s) instead of {self.threads}"
            )
            self.threads = wanted
            self._set_threads(wanted)
        return self.threads


class AdaptiveThreadsHook(HookBase):
    """Runs :meth:`AdaptiveThreads.update` after every training step (see the module doc).

    Args:
        threads: the controller; None builds one with the defaults, unless the user chose the
            thread count (:func:`threads_set_by_user`), in which case the hook does nothing.
    """

    def __init__(self, threads: Optional[AdaptiveThreads] = None):
        self.threads = threads

    def before_train(self):
        if self.threads is None:
            user = threads_set_by_user()
            if user:
                logger.info(f"{user}: keeping {torch.get_num_threads()} compute thread(s)")
                return
            self.threads = AdaptiveThreads()
        if self.threads.enabled:
            logger.info(
                f"Compute threads follow the free CPUs: at most {self.threads.max_threads} "
                f"of {self.threads.cpus}"
            )

    def after_step(self):
        if self.threads is not None:
            self.threads.update()
