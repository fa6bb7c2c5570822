"""CPU threads that follow the free cores: the controller and the hook."""

import pytest
import torch

from dino_d2.engine import threads as threads_module
from dino_d2.engine.threads import AdaptiveThreads, AdaptiveThreadsHook, default_num_threads
from dino_d2.utils.cpus import CpuLoadMonitor


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_user_threads(monkeypatch):
    for name in threads_module.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class _Scripted:
    """A monitor that returns scripted (seconds, other processes' cores) samples."""

    available = True

    def __init__(self, samples):
        self.samples = list(samples)

    def sample(self):
        return self.samples.pop(0)


def _controller(samples, **kwargs):
    calls = []
    controller = AdaptiveThreads(
        2, cpus=2, monitor=_Scripted(samples), set_threads=calls.append, **kwargs
    )
    return controller, calls


def test_steps_down_at_once_and_up_after_patience():
    busy, idle = (1.0, 1.0), (1.0, 0.05)
    controller, calls = _controller([idle, busy, busy, idle, idle, idle, idle], patience=3)
    assert calls == [2] and controller.threads == 2
    assert controller.update() == 2  # idle: keep two
    assert controller.update() == 1  # another process took a core: one thread at once
    assert controller.update() == 1
    assert [controller.update() for _ in range(3)] == [1, 1, 2]  # three idle samples in a row
    assert controller.update() == 2
    assert calls == [2, 1, 2]


def test_a_busy_sample_resets_the_patience():
    busy, idle = (1.0, 0.9), (1.0, 0.0)
    controller, calls = _controller([busy, idle, idle, busy, idle, idle, idle], patience=3)
    assert [controller.update() for _ in range(7)] == [1, 1, 1, 1, 1, 1, 2]


def test_samples_are_pooled_over_the_interval():
    # Four quarter-second samples, one of them fully busy: 0.25 cores on average, two threads.
    samples = [(0.25, 1.0), (0.25, 0.0), (0.25, 0.0), (0.25, 0.0)]
    samples += [(0.5, 1.0), (0.5, 0.6)]  # 0.8 cores on average: one thread
    controller, calls = _controller(samples, interval_s=1.0)
    assert [controller.update() for _ in range(6)] == [2, 2, 2, 2, 2, 1]
    assert controller.others == pytest.approx(0.8)


def test_nothing_to_adapt_with_one_thread_or_no_monitor(tmp_path):
    single, calls = AdaptiveThreads(1, cpus=2, monitor=_Scripted([])), []
    assert not single.enabled and single.update() == 1
    blind = AdaptiveThreads(
        2, cpus=2, monitor=CpuLoadMonitor(stat_path=str(tmp_path / "x")), set_threads=calls.append
    )
    assert not blind.enabled and blind.update() == 2 and calls == [2]


def test_a_thread_count_the_user_chose_is_kept(monkeypatch, no_user_threads):
    monkeypatch.setattr(threads_module, "available_cpus", lambda: 1)
    torch.set_num_threads(2)
    assert default_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_num_threads() == 2
    hook = AdaptiveThreadsHook()
    hook.before_train()
    assert hook.threads is None
    hook.after_step()
    assert torch.get_num_threads() == 2


def test_hook_updates_after_every_step(no_user_threads):
    controller, calls = _controller([(1.0, 1.0), (1.0, 1.0)])
    hook = AdaptiveThreadsHook(controller)
    hook.before_train()
    hook.after_step()
    hook.after_step()
    assert calls == [2, 1] and controller.threads == 1
