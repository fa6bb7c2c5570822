"""busy_cpu: spinning processes that live inside the block only, even when the caller is killed."""

import subprocess
import sys

import psutil
import pytest

from dino_d2.measure import busy_cpu


def test_busy_processes_run_inside_and_are_killed_after():
    with pytest.raises(RuntimeError, match="boom"):
        with busy_cpu(2, settle_s=0.1) as pids:
            assert len(pids) == 2
            assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
            raise RuntimeError("boom")
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_busy_processes_end_with_a_killed_benchmark():
    """A benchmark killed without clean-up (SIGKILL) leaves no spinning process behind."""
    script = (
        "from dino_d2.measure import busy_cpu\n"
        "import time\n"
        "with busy_cpu(1, settle_s=0.1) as pids:\n"
        "    print(pids[0], flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    spinner = psutil.Process(int(process.stdout.readline()))
    assert spinner.is_running()
    process.kill()
    process.wait()
    gone, _ = psutil.wait_procs([spinner], timeout=10)
    assert gone == [spinner]
