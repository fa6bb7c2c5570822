"""The CPUs this process may run on, and how busy other processes keep them.

* :func:`available_cpus`: the CPUs of this process's affinity mask, capped by its cgroup's CPU
  quota (a container on a large machine sees all of the host's cores otherwise);
* :class:`CpuLoadMonitor`: from ``/proc/stat``, how many of those CPUs other processes used
  since the previous sample, this process's own threads excluded.

The training's thread controller (:class:`dino_d2.engine.threads.AdaptiveThreads`) follows the
monitor; the benchmark (:mod:`dino_d2.measure`) reports it beside its timings.
"""

import math
import os
import time
from typing import Callable, Optional, Sequence, Tuple

__all__ = ["available_cpus", "CpuLoadMonitor"]


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
