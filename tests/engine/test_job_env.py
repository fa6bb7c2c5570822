"""dino_d2.engine.job_env: the job a process belongs to, from torchrun's or SLURM's variables."""

import pytest

from dino_d2.engine import job_env
from dino_d2.engine.job_env import (
    DistributedEnv,
    distributed_env,
    expand_hostlist,
    restarted,
    resume_after_restart,
    slurm_port,
)

TORCHRUN = dict(
    RANK="5",
    WORLD_SIZE="8",
    LOCAL_RANK="1",
    LOCAL_WORLD_SIZE="4",
    GROUP_RANK="1",
    MASTER_ADDR="node01",
    MASTER_PORT="29500",
    TORCHELASTIC_RUN_ID="job",
    TORCHELASTIC_RESTART_COUNT="2",
)
SRUN = dict(
    SLURM_PROCID="6",
    SLURM_NTASKS="8",
    SLURM_LOCALID="2",
    SLURM_TASKS_PER_NODE="4(x2)",
    SLURM_NODEID="1",
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_JOB_ID="123456",
)


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(job_env.shutil, "which", lambda name: None)


def test_hostlists_expand_like_scontrol():
    assert expand_hostlist("node01") == ["node01"]
    assert expand_hostlist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_hostlist("a[9-11],b7,c[1,3]") == ["a9", "a10", "a11", "b7", "c1", "c3"]
    assert expand_hostlist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    for bad in ("node[01-03", "node]1[", "node[3-1]", "node[a-b]"):
        with pytest.raises(ValueError, match="SLURM host list"):
            expand_hostlist(bad)


def test_torchrun_variables():
    env = distributed_env(TORCHRUN)
    assert env == DistributedEnv("torchrun", 5, 8, 1, 4, 1, "node01", 29500, restart_count=2)
    exported = {}
    env.export(exported)
    assert exported["RANK"] == "5" and exported["LOCAL_WORLD_SIZE"] == "4"
    plain = {k: v for k, v in TORCHRUN.items() if not k.startswith("TORCHELASTIC")}
    assert distributed_env(plain).source == "env"


def test_srun_variables():
    env = distributed_env(SRUN)
    assert env == DistributedEnv("slurm", 6, 8, 2, 4, 1, "gpu07", slurm_port(123456))
    assert distributed_env(dict(SRUN, SLURM_TASKS_PER_NODE="", SLURM_NTASKS_PER_NODE="4")) == env
    overridden = distributed_env(dict(SRUN, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"))
    assert (overridden.master_addr, overridden.master_port) == ("10.0.0.1", 1234)
    # torchrun's variables win over SLURM's (torchrun inside an srun step).
    assert distributed_env(dict(SRUN, **TORCHRUN)).source == "torchrun"


def test_one_task_allocations_and_plain_processes_are_not_jobs():
    assert distributed_env({}) is None
    assert distributed_env(dict(SRUN, SLURM_NTASKS="1", SLURM_PROCID="0")) is None


def test_inconsistent_variables_are_errors():
    with pytest.raises(ValueError, match="every node must run as many tasks"):
        distributed_env(dict(SRUN, SLURM_TASKS_PER_NODE="4,3"))
    with pytest.raises(ValueError, match="Inconsistent process ranks"):
        distributed_env(dict(TORCHRUN, RANK="8"))
    with pytest.raises(ValueError, match="not a multiple of 3 per machine"):
        distributed_env(dict(TORCHRUN, LOCAL_WORLD_SIZE="3"))
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        distributed_env(dict(SRUN, SLURM_PROCID="x"))


def test_the_port_is_the_same_in_every_task_and_in_range():
    assert slurm_port(123456) == slurm_port(123456)
    assert all(15000 <= slurm_port(job) < 35000 for job in (0, 1, 19999, 20000, 10**9))


def test_restarts_resume_when_a_checkpoint_is_there(tmp_path):
    assert not restarted({}) and not restarted({"TORCHELASTIC_RESTART_COUNT": "0"})
    assert restarted({"TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted({"SLURM_RESTART_COUNT": "2"})
    assert restarted({"DINO_D2_RESUME": "1"})
    again = {"TORCHELASTIC_RESTART_COUNT": "1"}
    assert not resume_after_restart(str(tmp_path), again)
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert resume_after_restart(str(tmp_path), again)
    assert not resume_after_restart(str(tmp_path), {})
