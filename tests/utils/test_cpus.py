"""The CPUs this process may use and the load monitor over ``/proc/stat``."""

import os
import time

import pytest

from dino_d2.utils import cpus as cpus_module
from dino_d2.utils.cpus import CpuLoadMonitor, available_cpus


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _stat_line(cpu, busy_ticks, idle_ticks=0):
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu{cpu} {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0\n"


class _FakeStat:
    """A /proc/stat whose per-CPU busy ticks the test advances (100 ticks a second)."""

    def __init__(self, path, cpus):
        self.path = str(path)
        self.busy = {cpu: 0 for cpu in cpus}
        self.write()

    def write(self):
        with open(self.path, "w") as f:
            total = sum(self.busy.values())
            f.write(f"cpu  {total} 0 0 0 0 0 0 0 0 0\n")
            f.writelines(_stat_line(cpu, ticks) for cpu, ticks in self.busy.items())
            f.write("intr 12345 0 0\n")

    def advance(self, seconds_per_cpu):
        ticks = os.sysconf("SC_CLK_TCK")
        for cpu, seconds in zip(self.busy, seconds_per_cpu):
            self.busy[cpu] += round(seconds * ticks)
        self.write()


def _monitor(tmp_path, monkeypatch, own_cpu):
    """A CpuLoadMonitor over a fake /proc/stat of CPUs 0 and 1 and a fake own CPU time."""
    monkeypatch.setattr(cpus_module, "_affinity", lambda: [0, 1])
    monkeypatch.setattr(cpus_module.time, "process_time", lambda: own_cpu[0])
    stat = _FakeStat(tmp_path / "stat", [0, 1])
    clock = _Clock()
    return CpuLoadMonitor(stat_path=stat.path, clock=clock), stat, clock


def test_monitor_subtracts_this_process(tmp_path, monkeypatch):
    own = [0.0]
    monitor, stat, clock = _monitor(tmp_path, monkeypatch, own)
    assert monitor.available
    # One second: the CPUs were busy 1.0 + 0.9 s, 1.2 s of which were this process's threads.
    stat.advance([1.0, 0.9])
    own[0] += 1.2
    clock.now += 1.0
    elapsed, others = monitor.sample()
    assert elapsed == pytest.approx(1.0) and others == pytest.approx(0.7)
    # CPUs outside the affinity mask and the aggregate "cpu" line are not counted.
    monkeypatch.setattr(cpus_module, "_affinity", lambda: [1])
    monitor = CpuLoadMonitor(stat_path=stat.path, clock=clock)
    stat.advance([1.0, 0.25])
    clock.now += 1.0
    assert monitor.sample()[1] == pytest.approx(0.25)


def test_monitor_without_proc_stat(tmp_path):
    monitor = CpuLoadMonitor(stat_path=str(tmp_path / "missing"))
    assert not monitor.available and monitor.sample() is None


def test_monitor_reads_this_machine():
    """On the real /proc/stat, the busy time of this process's CPUs covers its own CPU time.

    Other processes can only add busy time, so this holds however loaded the machine is; the
    figures themselves (seconds elapsed, other processes' cores) are not asserted.
    """
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system")
    monitor = CpuLoadMonitor()
    assert monitor.available and monitor.cpus
    _, busy_before, own_before = monitor._read()
    while time.process_time() - own_before < 0.3:  # CPU time of this process, not wall time
        sum(range(10000))
    _, busy_after, own_after = monitor._read()
    # /proc/stat counts in clock ticks: allow two per CPU of rounding.
    rounding = 2 * len(monitor.cpus) / os.sysconf("SC_CLK_TCK")
    assert busy_after - busy_before >= (own_after - own_before) - rounding - 0.05
    elapsed, others = monitor.sample()
    assert elapsed > 0 and others >= 0


def test_cgroup_quota_caps_the_cpus(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus_module._cgroup_cpu_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus_module._cgroup_cpu_quota(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus_module._cgroup_cpu_quota(str(v1)) == 1.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus_module._cgroup_cpu_quota(str(v1)) is None

    monkeypatch.setattr(cpus_module, "_affinity", lambda: list(range(64)))
    monkeypatch.setattr(cpus_module, "_cgroup_cpu_quota", lambda: 1.5)
    assert available_cpus() == 2
