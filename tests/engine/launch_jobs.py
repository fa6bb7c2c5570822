"""Jobs for tests/engine/test_launch.py, run by ``python launch_jobs.py`` as one "machine".

Usage: ``launch_jobs.py SCENARIO MACHINE_RANK NUM_MACHINES PROCESSES_PER_MACHINE PORT``. The
functions are at module level so that the spawned processes can import them. With SLURM's or
torch's variables set, give ``0 1 1 0``: the process joins the job they describe.
"""

import json
import os
import signal
import sys
import time

import torch.distributed as dist

from detectron2.utils import comm

from dino_d2.engine.launch import launch

FAILING_RANK = 1


def raise_in_one_rank():
    """Rank 1 raises after the start; the others wait outside any collective (a long
    evaluation, say), where only the launchers' supervision can stop them."""
    if dist.get_rank() == FAILING_RANK:
        time.sleep(1)
        raise ValueError(f"boom in rank {FAILING_RANK}")
    time.sleep(600)


def raise_in_rank_zero():
    """Rank 0 (on the machine that hosts the store) raises; the others wait in a collective."""
    if dist.get_rank() == 0:
        time.sleep(1)
        raise ValueError("boom in rank 0")
    dist.barrier()
    time.sleep(600)


def killed_in_one_rank():
    """Rank 1 is killed (out of memory, say): it reports nothing itself."""
    if dist.get_rank() == FAILING_RANK:
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def succeed_unevenly():
    """All ranks succeed; the last one finishes a few seconds after the others."""
    dist.barrier()
    if dist.get_rank() == dist.get_world_size() - 1:
        time.sleep(3)


def comm_state():
    """What Detectron2's comm sees in this process (a collective call)."""
    gathered = comm.all_gather(comm.get_rank())
    return {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "backend": dist.get_backend(),
        "gathered": gathered,
    }


def report():
    """Prints :func:`comm_state` as one JSON line."""
    print(f"REPORT {json.dumps(comm_state())}", flush=True)


def sleep_long():
    """Every rank leaves a file in $LAUNCH_TEST_MARKERS once running, then sleeps."""
    with open(os.path.join(os.environ["LAUNCH_TEST_MARKERS"], f"rank{dist.get_rank()}"), "w"):
        pass
    time.sleep(600)


SCENARIOS = {
    "raise": raise_in_one_rank,
    "raise_rank_zero": raise_in_rank_zero,
    "kill": killed_in_one_rank,
    "succeed": succeed_unevenly,
    "sleep": sleep_long,
    "report": report,
}

if __name__ == "__main__":
    scenario, machine, machines, per_machine, port = sys.argv[1:]
    print(f"launcher pid {os.getpid()}", flush=True)
    launch(
        SCENARIOS[scenario],
        int(per_machine),
        num_machines=int(machines),
        machine_rank=int(machine),
        dist_url=f"tcp://127.0.0.1:{port}",
    )
    print(f"machine {machine} finished", flush=True)
