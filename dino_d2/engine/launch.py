"""Launching a multi-process job in which one failing process stops every process within seconds.

:func:`launch` takes Detectron2's ``launch`` arguments and runs ``main_func`` in one process per
GPU with NCCL, or, without CUDA, in that many CPU processes with Gloo (Detectron2 v0.6's launcher
requires CUDA; see :mod:`dino_d2._compat` for the per-machine process group).

Without supervision, a process that raises (a NaN loss, an unreadable image, a full disk) stops
only itself: processes that wait for it in a collective operation notice at best when its
connections close, and with NCCL, or a process stuck elsewhere, only at the collective timeout
(30 minutes by default). A launcher on another machine cannot see the failure at all. Here:

* the launcher of machine 0 hosts the job's rendezvous store (a ``TCPStore`` at the
  ``--dist-url`` address, which the processes' process group also uses), so it outlives any
  process of the job; the launchers of the other machines connect to it;
* a process whose ``main_func`` raises writes the failure (rank, machine, host and traceback)
  to the store before it exits;
* every launcher watches its own processes and the store, every :data:`POLL_SECONDS`. When a
  failure appears in the store it stops its processes (SIGTERM, then SIGKILL after
  :data:`STOP_GRACE_SECONDS`; the failed process itself is given :data:`FAILED_EXIT_SECONDS` to
  exit) and raises :class:`JobFailedError` with the failed process's error and traceback. When
  one of its processes exits non-zero before that, it stops the others the same way, writes the
  failure to the store if the process could not (a SIGKILL, say) and raises that process's
  error;
* each launcher also counts a heartbeat in the store: a machine whose launcher stops beating for
  :data:`LOST_MACHINE_SECONDS` (a machine that went away), or a store that cannot be reached
  (machine 0's launcher went away), stops the others too;
* machine 0's launcher keeps the store up until every launcher has finished (at most
  :data:`FINISH_WAIT_SECONDS`), so that all of them can read a failure.

Checkpoints are written atomically, so a process stopped during a write leaves the last complete
checkpoint in place. The supervision needs a ``tcp://`` ``dist_url`` (Detectron2's default); with
another scheme the processes are started as Detectron2 does and only this machine's launcher
watches them.
"""

import gc
import json
import logging
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from detectron2.utils import comm

from .._compat import create_local_process_group

__all__ = [
    "DEFAULT_TIMEOUT",
    "POLL_SECONDS",
    "STOP_GRACE_SECONDS",
    "FAILED_EXIT_SECONDS",
    "LOST_MACHINE_SECONDS",
    "FINISH_WAIT_SECONDS",
    "JobFailedError",
    "launch",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 5.0
FAILED_EXIT_SECONDS = 30.0
LOST_MACHINE_SECONDS = 30.0
FINISH_WAIT_SECONDS = 60.0

_FAILURE_KEY = "dino_d2/failure"
_TRACEBACK_CHARS = 4000


class JobFailedError(RuntimeError):
    """Another process of the job failed; this machine's processes were stopped."""


def _tcp_address(dist_url: str) -> Optional[Tuple[str, int]]:
    url = urlparse(dist_url)
    if url.scheme != "tcp" or not url.hostname or url.port is None:
        return None
    return url.hostname, url.port


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Runs ``main_func(*args)`` in one process, or in ``num_gpus_per_machine`` spawned ones.

    Same arguments as Detectron2's ``launch``; see the module docstring for what happens when a
    process fails.

    Args:
        main_func: the function to run; it must be picklable (defined at a module's top level).
        num_gpus_per_machine: processes per machine (GPUs when CUDA is available).
        num_machines: number of machines.
        machine_rank: rank of this machine, ``0..num_machines-1``.
        dist_url: the rendezvous URL, e.g. ``"tcp://127.0.0.1:50152"``; ``"auto"`` (or None on
            one machine) picks a free local port.
        args: arguments of ``main_func``.
        timeout: timeout of the collective operations.

    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a process of
            this machine failed (with its traceback).
        JobFailedError: a process of another machine failed, or a machine went away.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url must be given explicitly for a multi-machine job")
        dist_url = "tcp://127.0.0.1:0"
    address = _tcp_address(dist_url)
    store = None
    if address is None:
        logger.warning(f"{dist_url}: only tcp:// URLs let one failing process stop other machines")
        if num_machines > 1 and dist_url.startswith("file://"):
            logger.warning("file:// is not a reliable init_method in multi-machine jobs")
    else:
        store = _connect(address, machine_rank == 0, timeout)
        address = (address[0], store.port)
        dist_url = f"tcp://{address[0]}:{address[1]}"
    context = mp.start_processes(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            address,
            tuple(args),
            timeout,
        ),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    _Supervisor(context, store, machine_rank, num_machines, num_gpus_per_machine).run()


def _connect(address: Tuple[str, int], is_master: bool, timeout: timedelta):
    """The launcher's connection to the job's store (machine 0's launcher hosts it)."""
    host, port = address
    # A client waits up to `timeout` for machine 0's launcher to start.
    store = dist.TCPStore(host, port, None, is_master, timeout, wait_for_workers=False)
    # Once connected, a store that stops answering means machine 0's launcher is gone.
    store.set_timeout(timedelta(seconds=LOST_MACHINE_SECONDS))
    return store


def _distributed_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    address: Optional[Tuple[str, int]],
    args: tuple,
    timeout: timedelta,
) -> None:
    use_cuda = torch.cuda.is_available()
    if use_cuda and num_gpus_per_machine > torch.cuda.device_count():
        raise RuntimeError(
            f"{num_gpus_per_machine} processes per machine requested but only "
            f"{torch.cuda.device_count()} GPUs are visible"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        # The processes share the machine's cores.
        torch.set_num_threads(max(1, torch.get_num_threads() // num_gpus_per_machine))
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    backend = "nccl" if use_cuda else "gloo"
    store = None
    try:
        if address is not None:
            store = dist.TCPStore(address[0], address[1], None, False, timeout)
            dist.init_process_group(
                backend, store=store, rank=global_rank, world_size=world_size, timeout=timeout
            )
        else:
            dist.init_process_group(
                backend,
                init_method=dist_url,
                world_size=world_size,
                rank=global_rank,
                timeout=timeout,
            )
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    try:
        create_local_process_group(num_gpus_per_machine)
        # One barrier before the work starts: a late process could otherwise time out a collective.
        comm.synchronize()
        main_func(*args)
        # Every process is done before any tears its connections down: Gloo aborts (SIGABRT) a
        # process whose peer closes a connection it still reads from.
        comm.synchronize()
    except Exception as error:
        if store is not None:
            _report_failure(
                store,
                rank=global_rank,
                machine=machine_rank,
                local_rank=local_rank,
                error=f"{type(error).__name__}: {error}",
                details=traceback.format_exc()[-_TRACEBACK_CHARS:],
            )
        raise
    finally:
        dist.destroy_process_group()
        # Release the process groups' and the store's C++ objects (and their threads) now:
        # left to interpreter exit, a still-joinable thread can abort the process (SIGABRT,
        # "terminate called without an active exception") after its work succeeded.
        del store
        gc.collect()


def _report_failure(store, **record) -> None:
    """Writes the job's first failure to the store (later ones keep the first)."""
    record.update(host=socket.gethostname(), pid=os.getpid())
    try:
        store.compare_set(_FAILURE_KEY, "", json.dumps(record))
    except Exception as error:  # the store may be gone with machine 0: nothing left to tell
        logger.warning(f"Could not report the failure to the job's store: {error}")


def _read_failure(store) -> Optional[Dict]:
    if not store.check([_FAILURE_KEY]):
        return None
    return json.loads(store.get(_FAILURE_KEY))


def _describe(record: Dict) -> str:
    return (
        f"process rank {record['rank']} (machine {record['machine']}, local rank "
        f"{record['local_rank']}, host {record.get('host')}, pid {record.get('pid')}) failed: "
        f"{record['error']}"
    )


class _Supervisor:
    """Watches this machine's processes and the job's store (see the module docstring)."""

    def __init__(self, context, store, machine_rank: int, num_machines: int, per_machine: int):
        self.context = context
        self.store = store
        self.machine_rank = machine_rank
        self.num_machines = num_machines
        self.per_machine = per_machine
        self._beats: Dict[int, Tuple[int, float]] = {}

    def run(self) -> None:
        try:
            while not self._join():
                if self.store is None:
                    continue
                try:
                    record = _read_failure(self.store)
                    self._beat()
                except dist.DistError as error:
                    self._stop_all()
                    raise JobFailedError(
                        f"Lost contact with the job's store (hosted by machine 0's launcher): "
                        f"{error}. Machine 0's launcher has stopped; this machine's processes "
                        "were stopped."
                    ) from error
                if record is not None:
                    self._stop_for(record)
        except BaseException:
            self._stop_all()
            self._finish()
            raise
        self._finish()

    def _join(self, timeout: float = POLL_SECONDS) -> bool:
        """``context.join``; a local failure is written to the store before it is raised."""
        try:
            # On a failure torch stops the other processes: SIGTERM after `grace_period`, SIGKILL
            # after another; they are stuck waiting for the failed one, so the first is short.
            return self.context.join(timeout=timeout, grace_period=1.0)
        except ProcessException as error:
            if self.store is not None:
                local_rank = error.error_index
                _report_failure(
                    self.store,
                    rank=self.machine_rank * self.per_machine + local_rank,
                    machine=self.machine_rank,
                    local_rank=local_rank,
                    error=str(error).strip().splitlines()[-1],
                    details=str(error)[-_TRACEBACK_CHARS:],
                )
            raise

    def _stop_for(self, record: Dict) -> None:
        """Stops this machine's processes because of ``record``; raises JobFailedError."""
        failed = None
        if record["machine"] == self.machine_rank:
            failed = self.context.processes[record["local_rank"]]
        self._stop_all(spare=failed)
        if failed is not None:
            # The failed process is ours and exiting: let it finish (its error file, its logs).
            failed.join(FAILED_EXIT_SECONDS)
            self._stop_all()
        raise JobFailedError(
            f"Stopping this machine's processes: {_describe(record)}\n"
            f"Its traceback:\n{record.get('details', '')}"
        )

    def _stop_all(self, spare=None) -> None:
        """SIGTERM, then SIGKILL after a grace period, for the processes still running (but
        ``spare``)."""
        processes = [p for p in self.context.processes if p.is_alive() and p is not spare]
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()

    def _beat(self) -> None:
        """Counts this launcher's heartbeat; raises JobFailedError for a machine gone quiet."""
        self.store.add(f"dino_d2/alive/{self.machine_rank}", 1)
        now = time.monotonic()
        for machine in range(self.num_machines):
            if machine == self.machine_rank:
                continue
            if self.store.check([f"dino_d2/finished/{machine}"]):
                continue
            beats = self.store.add(f"dino_d2/alive/{machine}", 0)
            last = self._beats.get(machine)
            if last is None or beats != last[0]:
                self._beats[machine] = (beats, now)
            elif beats > 0 and now - last[1] > LOST_MACHINE_SECONDS:
                self._stop_all()
                raise JobFailedError(
                    f"Machine {machine}'s launcher stopped answering for "
                    f"{LOST_MACHINE_SECONDS:.0f} s (the machine went away?); this machine's "
                    "processes were stopped."
                )

    def _finish(self) -> None:
        """Marks this launcher finished; machine 0's keeps the store up for the others."""
        if self.store is None:
            return
        try:
            self.store.set(f"dino_d2/finished/{self.machine_rank}", "1")
            if self.machine_rank != 0:
                return
            keys = [f"dino_d2/finished/{m}" for m in range(self.num_machines)]
            deadline = time.monotonic() + FINISH_WAIT_SECONDS
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        except dist.DistError as error:
            logger.warning(f"The job's store could not be reached at the end: {error}")
