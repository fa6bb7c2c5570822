"""tools/lazyconfig_train_net.py started by torchrun: one job of two processes on localhost,
and an elastic restart that resumes from the last checkpoint without ``--resume``.

Runs on the tiny digits set of test_lazyconfig_train_net.py; the restart case kills one process
with faulty_dino.FaultyDINO (``failure=kill``) in the job's first run only.
"""

import os

import pytest
import torch
from test_lazyconfig_train_net import (  # noqa: F401 (data is a fixture)
    TINY,
    checkpoint,
    data,
    final_eval,
    train_iterations,
)
from test_lazyconfig_train_net_failures import _port, finish, start

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs or none"
)


def torchrun(tmp_path, output_dir, *args, max_restarts=0):
    """Runs the script under ``torchrun --nproc-per-node 2``; returns (return code, output)."""
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_port()}"]
    launcher += ["--monitor-interval", "0.1", "--max-restarts", str(max_restarts)]
    return finish(start(tmp_path, output_dir, *args, launcher=launcher))[0]


def _log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return f.read()


def test_torchrun_runs_one_job_of_two_processes(data, tmp_path):  # noqa: F811
    output_dir = str(tmp_path / "out")
    code, output = torchrun(tmp_path, output_dir, "train.max_iter=2", *TINY, *data)
    assert code == 0, output[-5000:]
    log = _log(output_dir)
    assert "Rank of current process: 0. World size: 2" in log
    assert "World size: 1" not in output
    with open(os.path.join(output_dir, "log.txt.rank1")) as f:
        assert "Rank of current process: 1. World size: 2" in f.read()
    # One set of checkpoints and metrics, written by rank 0.
    assert sorted(f for f in os.listdir(output_dir) if f.startswith("model_")) == [
        "model_0000001.pth",
        "model_final.pth",
    ]
    assert train_iterations(output_dir) == [0, 1]
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 1
    assert "bbox/AP" in final_eval(output_dir)


def test_a_killed_process_is_restarted_and_the_job_resumes(data, tmp_path):  # noqa: F811
    """Rank 1 is killed in iteration 2 of the first run; torchrun restarts both processes, which
    continue from the checkpoint of iteration 1 without ``--resume``."""
    output_dir = str(tmp_path / "out")
    faulty = ["model._target_=faulty_dino.FaultyDINO", "model.fail_rank=1", "model.fail_call=3"]
    code, output = torchrun(
        tmp_path,
        output_dir,
        "train.max_iter=4",
        *TINY,
        *faulty,
        "model.failure=kill",
        *data,
        max_restarts=1,
    )
    assert code == 0, output[-5000:]
    log = _log(output_dir)  # both runs, one after the other
    assert log.count("Rank of current process: 0. World size: 2") == 2
    assert "Starting training from iteration 0" in log
    assert log.count("A restarted job: resuming from the last checkpoint") == 1
    assert "Starting training from iteration 2" in log
    final = checkpoint(output_dir, "model_final.pth")
    assert final["iteration"] == 3
    # The EMA went on from the checkpoint's 2 updates: 2 more after the restart.
    assert final["ema"]["num_updates"] == 4
