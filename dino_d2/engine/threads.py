"""CPU compute threads that follow the cores this process actually gets.

PyTorch splits every parallel operation into equal parts, one per thread, and waits for the
last. When another process keeps one of the cores busy, the thread that shares that core runs
only part of the time, every operation waits for it, and the waiting threads spin: with two
threads on a two-core machine a training step took 3-6 times as long as with an idle machine,
while one thread took 1.6 times. So the number of threads is chosen at run time:

* at the start (when :class:`AdaptiveThreads` is made), PyTorch's thread count is capped at the
  CPUs this process may run on (:func:`default_num_threads`: its affinity mask and its
  cgroup's CPU quota; a container on a large machine sees all of the host's cores otherwise);
* while it runs, :class:`AdaptiveThreads` measures, from ``/proc/stat``, how much of those CPUs
  other processes use (this process's own threads excluded), and uses as many threads as there
  are cores left, at least one. It steps down at once when others take a core, and back up only
  after the cores stayed free for a while. :class:`AdaptiveThreadsHook` does this between the
  steps of Detectron2's training loop.

A thread count the user chose (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` or ``TORCH_NUM_THREADS``
in the environment) is kept as it is. Without ``/proc/stat`` (not Linux) the count stays at
:func:`default_num_threads`. ``torch.set_num_threads`` applies to the calling thread's
parallel regions, so the changes are made on the thread that runs the model.
"""

import logging
import math
import os
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

from detectron2.engine import HookBase

__all__ = [
    "THREAD_ENV_VARS",
    "threads_set_by_user",
    "available_cpus",
    "default_num_threads",
    "CpuLoadMonitor",
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


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max`` or v1 CFS), or None."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _affinity() -> Sequence[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """The number of CPUs this process may use: its affinity mask, capped by its cgroup quota."""
    cpus = len(_affinity())
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def default_num_threads() -> int:
    """PyTorch's thread count, capped at :func:`available_cpus` unless the user chose it."""
    if threads_set_by_user():
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), available_cpus()))


class CpuLoadMonitor:
    """How many of this process's CPUs other processes kept busy since the previous sample.

    Reads the per-CPU lines of ``/proc/stat`` for the CPUs of the affinity mask; busy time is
    user, nice, system, irq, softirq and steal (time the hypervisor gave to other machines).
    This process's own CPU time (every thread; ``time.process_time``) is subtracted; its child
    processes (data-loader workers) count as others, since they compete for the same cores.

    Args:
        stat_path: the kernel's statistics file.
        clock: the wall clock.
    """

    def __init__(self, stat_path: str = "/proc/stat", clock: Callable[[], float] = time.monotonic):
        self.stat_path = stat_path
        self.clock = clock
        self.cpus = {f"cpu{i}" for i in _affinity()}
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    @property
    def available(self) -> bool:
        """Whether ``stat_path`` can be read (False on systems without ``/proc``)."""
        return self._last is not None

    def _read(self) -> Optional[Tuple[float, float, float]]:
        try:
            with open(self.stat_path) as f:
                lines = f.readlines()
        except OSError:
            return None
        busy_ticks = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in self.cpus:
                user, nice, system, _, _, irq, softirq, steal = map(int, fields[1:9])
                busy_ticks += user + nice + system + irq + softirq + steal
        return self.clock(), busy_ticks / self._ticks_per_s, time.process_time()

    def sample(self) -> Optional[Tuple[float, float]]:
        """``(seconds since the previous sample, cores used by other processes meanwhile)``.

        None when ``stat_path`` cannot be read.
        """
        current = self._read()
        if current is None or self._last is None:
            return None
        (then, busy_then, own_then), (now, busy_now, own_now) = self._last, current
        self._last = current
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        others = max(0.0, (busy_now - busy_then) - (own_now - own_then)) / elapsed
        return elapsed, others


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
