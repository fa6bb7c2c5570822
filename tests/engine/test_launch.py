"""dino_d2.engine.launch: CPU processes with Gloo, and one failing process stops the whole job.

The multi-process jobs run as separate launcher processes (``launch_jobs.py``), one per
"machine", all on localhost, or as processes that SLURM's variables place in one job. In the
failure scenarios the processes that do not fail sleep for 10 minutes outside any collective
operation: only the job's failure record can stop them, and a test that hangs runs into its
subprocess timeout.
"""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dino_d2.engine.launch import launch

# The module (dino_d2.engine.launch is the function, as in Detectron2).
launch_module = importlib.import_module("dino_d2.engine.launch")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
JOBS = os.path.join(HERE, "launch_jobs.py")
TIMEOUT = 120  # seconds; the processes that do not fail would sleep 600

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs or none"
)


def _distributed_probe(queue):
    """Runs in each launched process: reports what Detectron2's comm sees."""
    from launch_jobs import comm_state

    queue.put(comm_state())


def _check_reports(reports):
    """Two processes of one machine, as Detectron2's comm sees them."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    for rank, report in enumerate(reports):
        assert report == {
            "rank": rank,
            "world_size": 2,
            "local_rank": rank,
            "local_size": 2,
            "backend": backend,
            "gathered": [0, 1],
        }


def _run_in_single_process(results):
    results.append("ran")


def test_launch_one_process_runs_in_place():
    results = []
    launch(_run_in_single_process, 1, args=(results,))
    assert results == ["ran"]


def test_launch_two_processes_sets_up_detectron2_comm():
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    launch(_distributed_probe, 2, dist_url="auto", args=(queue,))
    _check_reports(sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"]))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(scenario, machine, machines, per_machine, port, **env):
    path = os.pathsep.join(p for p in (REPO, HERE, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(
        [sys.executable, JOBS, scenario, str(machine), str(machines), str(per_machine), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a test can kill a "machine" with all its processes
    )


def _finish(launchers):
    """Waits for every launcher (killing all on a timeout); returns (return code, output)."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for launcher in launchers:
            output, _ = launcher.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((launcher.returncode, output))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    return results


def _machines(scenario, machines=2, per_machine=1, **env):
    port = _free_port()
    return [_start(scenario, m, machines, per_machine, port, **env) for m in range(machines)]


def test_an_exception_on_one_machine_stops_the_other():
    (code_0, output_0), (code_1, output_1) = _finish(_machines("raise"))
    assert code_0 != 0 and code_1 != 0
    # Machine 0 was only waiting: it shows the failing process's error and where it came from.
    assert "JobFailedError: The job was stopped: process rank 1 (machine 1, " in output_0
    assert "failed: ValueError: boom in rank 1" in output_0
    assert 'launch_jobs.py", line' in output_0  # the failing process's traceback
    assert "ValueError: boom in rank 1" in output_1
    assert "finished" not in output_0 + output_1


def test_an_exception_on_the_machine_of_the_store_stops_the_other():
    results = _finish(_machines("raise_rank_zero"))
    assert all(code != 0 for code, _ in results)
    for _, output in results:
        assert "boom in rank 0" in output


def test_a_killed_process_stops_the_other_machine():
    (code_0, output_0), (code_1, output_1) = _finish(_machines("kill"))
    assert code_0 != 0 and code_1 != 0
    for output in (output_0, output_1):
        assert "process rank 1 (machine 1, local rank 0" in output
        assert "failed: Signal 9 (SIGKILL) received by PID" in output


def test_machines_that_finish_at_different_times_all_succeed():
    results = _finish(_machines("succeed"))
    for machine, (code, output) in enumerate(results):
        assert code == 0, output[-3000:]
        assert f"machine {machine} finished" in output


def test_a_machine_that_goes_away_stops_the_others(tmp_path):
    launchers = _machines("sleep", LAUNCH_TEST_MARKERS=str(tmp_path))
    try:
        deadline = time.monotonic() + TIMEOUT
        while sorted(os.listdir(tmp_path)) != ["rank0", "rank1"]:
            assert time.monotonic() < deadline and all(p.poll() is None for p in launchers)
            time.sleep(0.2)
        os.killpg(launchers[0].pid, signal.SIGKILL)  # machine 0 and its store are gone
        ((code_1, output_1),) = _finish(launchers[1:])
    finally:
        _finish(launchers)
    assert code_1 != 0
    assert "Lost contact with the job's store (machine 0 went away?)" in output_1


def test_srun_style_variables_make_two_processes_join_one_job():
    """Two processes started as ``srun --ntasks 2`` starts them, on localhost."""
    slurm = dict(
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="4242",
        MASTER_PORT=str(_free_port()),
    )
    processes = [
        _start("report", 0, 1, 1, 0, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **slurm)
        for rank in range(2)
    ]
    reports = []
    for code, output in _finish(processes):
        assert code == 0, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
        reports.append(json.loads(lines[0][len("REPORT ") :]))
    _check_reports(reports)


def test_num_gpus_in_a_job_started_from_outside_is_an_error(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(ValueError, match="started by torchrun as rank 0 of 2: .* drop those flags"):
        launch(_run_in_single_process, 2, args=([],))


def test_the_rendezvous_endpoint_comes_from_tcp_urls():
    assert launch_module._endpoint("tcp://10.0.0.2:50152", 2) == ("10.0.0.2", 50152)
    assert launch_module._endpoint("tcp://[::1]:50152", 2) == ("::1", 50152)
    host, port = launch_module._endpoint("auto", 1)
    assert host == "127.0.0.1" and port > 0
    with pytest.raises(ValueError, match="must be tcp://HOST:PORT of machine 0"):
        launch_module._endpoint("auto", 2)
    with pytest.raises(ValueError, match="'file:///tmp/x': expected tcp://HOST:PORT"):
        launch_module._endpoint("file:///tmp/x", 1)
