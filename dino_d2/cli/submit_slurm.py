"""Submit a training run of tools/lazyconfig_train_net.py as a SLURM job, with submitit.

Every option this script does not know goes to the training script::

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition learn --time 4320 \\
        --config-file configs/dino_r50_4scale_12ep.py train.output_dir=/checkpoint/dino_r50

starts ``nodes x gpus-per-node`` tasks (one per GPU) that join one job (see
:mod:`dino_d2.engine.launch`). On pre-emption or timeout, submitit requeues the job, which resumes
from the last checkpoint of ``train.output_dir`` (:class:`dino_d2.engine.slurm.TrainingJob`).
``--cluster local`` runs the job on this machine with submitit's LocalExecutor (to try the
set-up); ``--wait`` waits for the job and shows its result.
"""

import argparse
import logging
import sys
from typing import List, Optional

from dino_d2.cli.train_net import invoke_main
from dino_d2.engine.slurm import TrainingJob

__all__ = ["build_parser", "submit", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options (--config-file, --eval-only, key=value overrides) go to "
        "tools/lazyconfig_train_net.py.",
    )
    parser.add_argument("--nodes", type=int, default=1, help="machines")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (and tasks) per node")
    parser.add_argument(
        "--tasks-per-node", type=int, help="processes per node (default: --gpus-per-node, or 1)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--mem", type=int, help="memory per node, GB (default: SLURM's)")
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit, minutes")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--constraint", help="SLURM constraint, e.g. volta32gb")
    parser.add_argument("--job-name", default="dino_d2")
    parser.add_argument(
        "--log-dir", default="slurm_logs", help="submitit's folder: the job's logs and pickles"
    )
    parser.add_argument(
        "--cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="local: run here with submitit's LocalExecutor",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the job, show its result")
    return parser


def _executor(args):
    import submitit

    executor = submitit.AutoExecutor(folder=args.log_dir, cluster=args.cluster)
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    parameters = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        # submitit signals the job this long before its time runs out, to requeue it.
        slurm_signal_delay_s=120,
    )
    if args.gpus_per_node:
        parameters["gpus_per_node"] = args.gpus_per_node
    if args.mem:
        parameters["mem_gb"] = args.mem
    for key in ("partition", "account", "constraint"):
        if getattr(args, key):
            parameters[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**parameters)
    return executor


def submit(argv: Optional[List[str]] = None):
    """Parses ``argv`` (default ``sys.argv[1:]``) and submits the job.

    Returns:
        (the submitit job, the parsed options of this script).

    Raises:
        SystemExit: no ``--config-file`` among the training script's arguments.
    """
    parser = build_parser()
    args, train_argv = parser.parse_known_args(argv)
    if not any(a == "--config-file" or a.startswith("--config-file=") for a in train_argv):
        parser.error("the training script needs --config-file (see tools/lazyconfig_train_net.py)")
    job = _executor(args).submit(TrainingJob(invoke_main, train_argv))
    print(f"Submitted job {job.job_id}; logs in {args.log_dir}", flush=True)
    return job, args


def main(argv: Optional[List[str]] = None) -> int:
    job, args = submit(argv)
    if args.wait:
        job.result()  # raises submitit's FailedJobError with the job's error
        print(f"Job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
