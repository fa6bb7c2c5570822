"""Which process of which job this is, when something other than ``--num-gpus`` started it.

A training script started by ``torchrun`` (or torch's elastic agent), by SLURM's ``srun``, or by
a launcher that exports torch's variables (submitit's ``TorchDistributedEnvironment``) joins the
job it belongs to instead of starting processes itself. :func:`distributed_env` reads, in this
order:

* torch's variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT`` (and ``GROUP_RANK`` / ``TORCHELASTIC_RUN_ID`` /
  ``TORCHELASTIC_RESTART_COUNT`` under torchrun);
* else, with ``SLURM_NTASKS > 1``, SLURM's: rank ``SLURM_PROCID``, world ``SLURM_NTASKS``,
  local rank ``SLURM_LOCALID``, processes on this node from ``SLURM_NTASKS_PER_NODE`` (or
  ``SLURM_TASKS_PER_NODE``), node ``SLURM_NODEID``; the master address is ``MASTER_ADDR`` if set,
  else the first host of ``SLURM_JOB_NODELIST``; the port ``MASTER_PORT`` if set, else
  :func:`slurm_port` of ``SLURM_JOB_ID``.

A SLURM allocation of one task (``salloc``, an ``sbatch`` script with ``--ntasks 1``) is not a
distributed job: ``--num-gpus`` starts the processes there, as on any machine.

:func:`restarted` tells whether this process is a restart of a job that already ran (an elastic
restart, a SLURM requeue, a submitit resubmission): the training script then resumes from the
output folder's last checkpoint without ``--resume``.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

__all__ = [
    "RESUME_ENV",
    "DistributedEnv",
    "distributed_env",
    "expand_hostlist",
    "slurm_port",
    "restarted",
    "resume_after_restart",
]

#: Set to 1 by dino_d2's SLURM launcher in a requeued job (see :mod:`dino_d2.engine.slurm`).
RESUME_ENV = "DINO_D2_RESUME"

_TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """One process's place in a job started from outside (see the module docstring).

    Invariants: ``0 <= rank < world_size``, ``0 <= local_rank < local_world_size``,
    ``world_size % local_world_size == 0`` (Detectron2's per-machine process group needs equal
    machines).

    Attributes:
        source: ``"torchrun"``, ``"env"`` (torch's variables without torchrun) or ``"slurm"``.
        rank, world_size: the process's global rank and the number of processes.
        local_rank, local_world_size: its rank on its machine and the processes per machine.
        machine_rank: the machine's rank.
        master_addr, master_port: where rank 0's (or torchrun's) store listens.
        restart_count: how many times torchrun restarted the job (0 otherwise).
    """

    source: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    machine_rank: int
    master_addr: str
    master_port: int
    restart_count: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"Inconsistent process ranks from the {self.source} variables: {self}")
        if self.world_size % self.local_world_size:
            raise ValueError(
                f"{self.world_size} processes are not a multiple of {self.local_world_size} per "
                f"machine ({self.source} variables): every machine must run as many processes"
            )

    def export(self, environ: Optional[dict] = None) -> None:
        """Writes torch's variables (``env://``) into ``environ`` (default ``os.environ``)."""
        environ = os.environ if environ is None else environ
        environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            GROUP_RANK=str(self.machine_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"{key}={environ[key]!r} is not an integer") from None


def distributed_env(environ: Optional[Mapping[str, str]] = None) -> Optional[DistributedEnv]:
    """The job this process belongs to, from ``environ`` (default ``os.environ``), or None.

    Raises:
        ValueError: a variable is not a number, or the ranks are inconsistent.
    """
    environ = os.environ if environ is None else environ
    if all(key in environ for key in _TORCH_KEYS):
        world_size = _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world_size
        rank = _int(environ, "RANK")
        return DistributedEnv(
            source="torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env",
            rank=rank,
            world_size=world_size,
            local_rank=_int(environ, "LOCAL_RANK"),
            local_world_size=local,
            machine_rank=_int(environ, "GROUP_RANK") if "GROUP_RANK" in environ else rank // local,
            master_addr=environ["MASTER_ADDR"],
            master_port=_int(environ, "MASTER_PORT"),
            restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return _slurm_env(environ)
    return None


def _slurm_env(environ: Mapping[str, str]) -> DistributedEnv:
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not per_node:
        raise ValueError("SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE is not set")
    # "4" or "4(x2)" or "4,3": the tasks of this node are those of the node's entry.
    counts = [int(re.match(r"\d+", entry).group()) for entry in per_node.split(",")]
    if len(set(counts)) != 1:
        raise ValueError(
            f"SLURM_TASKS_PER_NODE={per_node}: every node must run as many tasks (use "
            "--ntasks-per-node)"
        )
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in environ:
        master_addr = _slurm_hostnames(environ["SLURM_JOB_NODELIST"])[0]
    else:
        raise ValueError("Neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        master_port = slurm_port(_int(environ, "SLURM_JOB_ID"))
    else:
        raise ValueError("Neither MASTER_PORT nor SLURM_JOB_ID is set")
    return DistributedEnv(
        source="slurm",
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_rank=_int(environ, "SLURM_LOCALID"),
        local_world_size=counts[0],
        machine_rank=_int(environ, "SLURM_NODEID"),
        master_addr=master_addr,
        master_port=master_port,
    )


def slurm_port(job_id: int) -> int:
    """A port for the job's store, the same in every task of the job: 15000 + job id % 20000
    (below the usual range of ephemeral ports, 32768-60999)."""
    return 15000 + job_id % 20000


def _slurm_hostnames(nodelist: str) -> List[str]:
    """``scontrol show hostnames`` when SLURM's tools are installed, else
    :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        result = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
        )
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
    return expand_hostlist(nodelist)


def expand_hostlist(nodelist: str) -> List[str]:
    """Expands SLURM's compressed host list: ``"node[01-03,07],gpu-a[1-2]b"`` is ``node01,
    node02, node03, node07, gpu-a1b, gpu-a2b`` (zero padding kept; several bracket groups in one
    name multiply).

    Raises:
        ValueError: unbalanced brackets or a malformed range.
    """
    names, depth, start = [], 0, 0
    for position, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM host list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            if position > start:
                names.extend(_expand_name(nodelist[start:position], nodelist))
            start = position + 1
    if depth:
        raise ValueError(f"SLURM host list {nodelist!r}: unbalanced brackets")
    return names


def _expand_name(name: str, nodelist: str) -> List[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    values = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif (
            len(bounds) == 2
            and all(b.isdigit() for b in bounds)
            and int(bounds[0]) <= int(bounds[1])
        ):
            width = len(bounds[0])
            values += [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"SLURM host list {nodelist!r}: bad range {part!r} in {name!r}")
    return [
        expanded for value in values for expanded in _expand_name(head + value + tail, nodelist)
    ]


def restarted(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True in a restart of a job that already ran: ``TORCHELASTIC_RESTART_COUNT > 0`` (torchrun's
    restarts), ``SLURM_RESTART_COUNT > 0`` (a requeued SLURM job) or ``DINO_D2_RESUME=1``."""
    environ = os.environ if environ is None else environ
    return (
        int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        or int(environ.get("SLURM_RESTART_COUNT", 0)) > 0
        or environ.get(RESUME_ENV) == "1"
    )


def resume_after_restart(output_dir: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when this process is a restart (:func:`restarted`) and ``output_dir`` holds a
    checkpoint (Detectron2's ``last_checkpoint`` file): the job continues from it."""
    return restarted(environ) and os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
