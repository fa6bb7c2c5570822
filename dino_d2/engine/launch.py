"""Starting a job's processes with torch's elastic agent, or joining a job started from outside.

:func:`launch` takes Detectron2's ``launch`` arguments:

* in a process that ``torchrun``, ``srun`` or submitit started (:func:`~dino_d2.engine.job_env.
  distributed_env`), it joins that job: it starts no process itself, and ``--num-gpus`` above 1 is
  an error;
* else, for ``num_machines * num_gpus_per_machine > 1``, it runs torch's elastic agent
  (``torch.distributed.launcher.api.elastic_launch``) on this machine: ``num_gpus_per_machine``
  processes, a "static" rendezvous at ``dist_url`` (machine ``machine_rank`` keeps its rank, as
  in Detectron2; machine 0 hosts the job's store) and no restarts. The agent checks its processes
  every :data:`MONITOR_SECONDS` and stops all of them when one fails.

Every process initialises the process group from torch's variables (a store at
``MASTER_ADDR:MASTER_PORT``, with keys of its own in each run of a restarted job): NCCL with
CUDA, Gloo without (each process then takes its share of the CPU threads), and Detectron2's
per-machine group (:func:`dino_d2._compat.create_local_process_group`).

What the agent does not do is tell the other machines. Here:

* a process whose work raises writes its failure (rank, machine, host, traceback) to the job's
  store, unless another process wrote one first; a process that fails because another one did
  (a collective whose peer is gone) raises :class:`JobFailedError` with that process's failure;
* every process checks the store every :data:`POLL_SECONDS` and stops (exit code 1, with the
  failure as its error) when another process's failure appears or the store is gone;
* a launcher whose agent reports a failure writes it to the store if its process could not (a
  SIGKILL), and raises :class:`JobFailedError` with the job's first failure and its traceback.

Each process ends with a barrier and destroys its process group: a process group or store left
to interpreter exit can abort a process whose work succeeded (SIGABRT, a joinable C++ thread).
"""

import gc
import json
import logging
import os
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from detectron2.utils import comm

from .._compat import create_local_process_group
from .job_env import DistributedEnv, distributed_env

__all__ = [
    "DEFAULT_TIMEOUT",
    "MONITOR_SECONDS",
    "POLL_SECONDS",
    "FINISH_WAIT_SECONDS",
    "JobFailedError",
    "launch",
    "run_in_job",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: How often the elastic agent checks its processes.
MONITOR_SECONDS = 0.1
#: How often a process checks the job's store for another process's failure.
POLL_SECONDS = 0.5
#: How long a launcher keeps the job's store up after a failure, for the other machines.
FINISH_WAIT_SECONDS = 10.0

_FAILURE_KEY = "dino_d2/failure/{attempt}"
_DONE_KEY = "dino_d2/done/{machine}"
_TRACEBACK_CHARS = 4000


class JobFailedError(RuntimeError):
    """A process of the job failed; every process of the job was stopped."""


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Runs ``main_func(*args)`` in this process, or in the processes of a job (module doc).

    Args:
        main_func: the function to run; it must be picklable (defined at a module's top level).
        num_gpus_per_machine: processes per machine (GPUs when CUDA is available).
        num_machines: number of machines.
        machine_rank: rank of this machine, ``0..num_machines-1``.
        dist_url: ``"tcp://HOST:PORT"`` of machine 0; ``"auto"`` (or None) on one machine picks a
            free local port.
        args: arguments of ``main_func``.
        timeout: timeout of the collective operations.

    Raises:
        ValueError: ``--num-gpus`` above 1 in a job started by torchrun/SLURM; a ``dist_url``
            that is not ``tcp://HOST:PORT`` for several machines.
        JobFailedError: a process of the job failed (its error and traceback in the message).
    """
    env = distributed_env()
    if env is not None:
        if num_gpus_per_machine > 1 or num_machines > 1:
            raise ValueError(
                f"This process was started by {env.source} as rank {env.rank} of "
                f"{env.world_size}: the processes are started by it, not by --num-gpus "
                f"{num_gpus_per_machine} / --num-machines {num_machines}; drop those flags"
            )
        run_in_job(main_func, args, env, timeout)
        return
    if num_machines * num_gpus_per_machine <= 1:
        main_func(*args)
        return
    host, port = _endpoint(dist_url, num_machines)
    store = dist.TCPStore(
        host,
        port,
        None,
        machine_rank == 0,
        timeout,
        wait_for_workers=False,
        multi_tenant=True,  # the agent's rendezvous on machine 0 shares this server
    )
    config = LaunchConfig(
        min_nodes=num_machines,
        max_nodes=num_machines,
        nproc_per_node=num_gpus_per_machine,
        run_id=f"dino_d2_{port}",
        rdzv_backend="static",
        rdzv_endpoint=f"{host}:{port}",
        rdzv_configs={"rank": machine_rank, "timeout": int(timeout.total_seconds())},
        max_restarts=0,
        monitor_interval=MONITOR_SECONDS,
        start_method="spawn",
    )
    try:
        elastic_launch(config, _elastic_worker)(main_func, tuple(args), timeout)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            details = message.get("extraInfo", {}).get("py_callstack", "")
            message = message["message"]
        else:
            details = ""
        own = _failure_record(rank, machine_rank, failure.local_rank, message, details)
        own["pid"] = failure.pid
        first = _exchange_failure(store, 0, own)
        raise JobFailedError(f"The job was stopped: {_describe(first)}") from None
    finally:
        _finish(store, machine_rank, num_machines)


def _endpoint(dist_url: Optional[str], num_machines: int):
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url must be tcp://HOST:PORT of machine 0 for several machines")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return "127.0.0.1", sock.getsockname()[1]
    url = urlparse(dist_url)
    if url.scheme != "tcp" or not url.hostname or url.port is None:
        raise ValueError(f"--dist-url {dist_url!r}: expected tcp://HOST:PORT (or auto)")
    return url.hostname, url.port


@record
def _elastic_worker(main_func: Callable, args: tuple, timeout: timedelta) -> None:
    """A process the elastic agent started; ``@record`` writes its error for the agent."""
    run_in_job(main_func, args, distributed_env(), timeout)


def run_in_job(
    main_func: Callable, args: Sequence, env: DistributedEnv, timeout: timedelta = DEFAULT_TIMEOUT
) -> None:
    """Runs ``main_func(*args)`` as process ``env.rank`` of a job (see the module docstring).

    Raises:
        RuntimeError: more processes per machine than visible GPUs.
        JobFailedError: another process failed first.
    """
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"Local rank {env.local_rank} has no GPU: {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(env.local_rank)
    else:
        # The processes of a machine share its cores.
        torch.set_num_threads(max(1, torch.get_num_threads() // env.local_world_size))
    env.export()
    # torchrun's agent hosts the store and keeps it across restarts: each run gets its own keys
    # (a process of a restarted run could otherwise read a peer's address of the run before).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = env.rank == 0 and not agent_store
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size if hosts else None,
        hosts,
        timeout,
        wait_for_workers=False,
        multi_tenant=True,
    )
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=dist.PrefixStore(f"dino_d2/run_{env.restart_count}", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    watch = None
    try:
        create_local_process_group(env.local_world_size)
        watch = _FailureWatch(env)
        # One barrier before the work starts: a late process could otherwise time out a collective.
        comm.synchronize()
        main_func(*args)
        # Every process is done before any tears its connections down: Gloo aborts (SIGABRT) a
        # process whose peer closes a connection it still reads from.
        comm.synchronize()
    except Exception as error:
        if watch is None:
            raise
        own = _failure_record(
            env.rank,
            env.machine_rank,
            env.local_rank,
            f"{type(error).__name__}: {error}",
            traceback.format_exc(),
        )
        first = _exchange_failure(watch.store, env.restart_count, own)
        if first is not None and first["rank"] != env.rank:
            raise JobFailedError(f"Stopped because {_describe(first)}") from error
        raise
    finally:
        if watch is not None:
            watch.stop()
        dist.destroy_process_group()
        # Release the process groups' and the store's C++ objects (and their threads) now.
        del watch, store
        gc.collect()


def _failure_record(rank, machine, local_rank, error: str, details: str) -> Dict:
    return {
        "rank": rank,
        "machine": machine,
        "local_rank": local_rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "error": error.strip().splitlines()[0] if error.strip() else error,
        "details": details[-_TRACEBACK_CHARS:],
    }


def _exchange_failure(store, attempt: int, record: Dict) -> Dict:
    """Writes ``record`` as the job's failure unless one is there; returns the first one (or
    ``record`` when the store cannot be reached)."""
    key = _FAILURE_KEY.format(attempt=attempt)
    try:
        store.compare_set(key, "", json.dumps(record))
        return json.loads(store.get(key))
    except dist.DistError as error:  # the store left with machine 0: nothing more to learn
        logger.warning(f"Could not reach the job's store to report the failure: {error}")
        return record


def _describe(record: Dict) -> str:
    text = (
        f"process rank {record['rank']} (machine {record['machine']}, local rank "
        f"{record['local_rank']}, host {record['host']}, pid {record['pid']}) failed: "
        f"{record['error']}"
    )
    if record.get("details"):
        text += f"\nIts traceback:\n{record['details']}"
    return text


def _finish(store, machine_rank: int, num_machines: int) -> None:
    """Marks this launcher done; machine 0's keeps the store up a while for the others."""
    try:
        store.set(_DONE_KEY.format(machine=machine_rank), "1")
        if machine_rank != 0:
            return
        keys = [_DONE_KEY.format(machine=m) for m in range(num_machines)]
        deadline = time.monotonic() + FINISH_WAIT_SECONDS
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    except dist.DistError as error:
        logger.warning(f"The job's store could not be reached at the end: {error}")


class _FailureWatch:
    """A thread that stops this process when another process's failure appears in the job's store
    (the one at ``MASTER_ADDR:MASTER_PORT``), or when the store is gone."""

    def __init__(self, env: DistributedEnv):
        self.env = env
        self.store = dist.TCPStore(
            env.master_addr, env.master_port, None, False, timedelta(seconds=30)
        )
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dino_d2-failure-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        key = _FAILURE_KEY.format(attempt=self.env.restart_count)
        while not self._stopped.wait(POLL_SECONDS):
            try:
                if not self.store.check([key]):
                    continue
                first = json.loads(self.store.get(key))
            except dist.DistError as error:
                self._exit(f"Lost contact with the job's store (machine 0 went away?): {error}")
                return
            if first["rank"] != self.env.rank:
                self._exit(f"Stopped because {_describe(first)}")
                return

    def _exit(self, message: str) -> None:
        """Ends this process at once: its main thread may be stuck in a collective operation."""
        if self._stopped.is_set():
            return
        error = JobFailedError(message)
        logger.error(f"Rank {self.env.rank}: {message}")
        ErrorHandler().record_exception(error)  # the agent's report shows it (torchrun)
        logging.shutdown()
        os._exit(1)
