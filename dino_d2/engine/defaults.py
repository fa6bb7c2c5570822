"""The start of a training or evaluation job: logging, config backup, seeding, devices.

:func:`default_setup` does what Detectron2's ``default_setup`` does (which fails on the PyPI
v0.6 wheel, see :mod:`dino_d2._compat`). The datasets a job trains on are registered by
:mod:`dino_d2.data.overrides`.
"""

import functools
import logging
import os
import sys
from typing import Optional

import torch
from omegaconf import DictConfig

from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .. import _compat
from .output_dir import check_writable, prepare_output_dir
from .train_keys import check_train_keys
from .train_options import TrainOptions

__all__ = [
    "default_setup",
    "drop_log_files_on_error",
    "resolve_device",
]


def default_setup(cfg: DictConfig, args) -> None:
    """Sets up a job like Detectron2's ``default_setup``, for LazyConfigs.

    1. creates ``cfg.train.output_dir`` and checks that it is writable (main process), then logs
       the ``detectron2``, ``dino_d2`` and ``fvcore`` loggers to the console (main process) and
       to ``output_dir/log.txt`` (``.rankN`` for others; see :func:`drop_log_files_on_error`);
    2. logs the rank, the environment, the command line and the config file;
    3. checks that the folder does not hold another config's checkpoints (a warning, or an
       error with ``--resume``) and saves the config as ``output_dir/config.yaml``, atomically
       (main process; see :func:`dino_d2.engine.output_dir.prepare_output_dir`);
    4. warns about keys under ``train`` that nothing reads (:func:`check_train_keys`);
    5. seeds every random generator with ``train.seed + rank`` (a random seed when negative);
    6. sets ``torch.backends.cudnn.benchmark`` from ``train.cudnn_benchmark`` (default False)
       unless evaluating only.

    Args:
        cfg: the LazyConfig, with overrides applied.
        args: the parsed command line (``config_file``, ``resume`` and ``eval_only`` are read if
            present).

    Raises:
        dino_d2.utils.OutputWriteError: the output folder is not writable.
        dino_d2.engine.output_dir.OutputDirConflictError: ``--resume`` in a folder holding the
            checkpoints of another model or other training datasets.
    """
    options = TrainOptions.from_config(cfg.train)
    output_dir = options.output_dir
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        check_writable(output_dir)
    loggers = [
        setup_logger(output_dir, distributed_rank=rank, name="fvcore"),
        setup_logger(output_dir, distributed_rank=rank, name="dino_d2", abbrev_name="dino_d2"),
        setup_logger(output_dir, distributed_rank=rank),
    ]
    drop_log_files_on_error(*loggers)
    logger = loggers[-1]

    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + _compat.collect_env_info())
    logger.info(f"Command line arguments: {args}")
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file) as f:
            logger.info(f"Contents of args.config_file={config_file}:\n{f.read()}")

    if comm.is_main_process() and output_dir:
        path = prepare_output_dir(cfg, resume=bool(getattr(args, "resume", False)))
        logger.info(f"Full config saved to {path}")
    check_train_keys(cfg.train)

    seed = options.seed
    seed_all_rng(None if seed < 0 else seed + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = options.cudnn_benchmark


def _drop_handler(logger: logging.Logger, handler: logging.Handler, record) -> None:
    error = sys.exc_info()[1]
    logger.removeHandler(handler)
    name = getattr(handler.stream, "name", "the log file")
    sys.stderr.write(
        f"dino_d2: {name} cannot be written ({error}); logger '{logger.name}' logs to the "
        "console only from here on\n"
    )


def drop_log_files_on_error(*loggers: logging.Logger) -> None:
    """Makes a log file that cannot be written (a full disk) leave its logger with one message.

    Python's logging prints a traceback for every line that fails to reach a file; with a full
    disk, those hide the error that stops the job. After this call a file handler of
    ``loggers`` whose write fails is removed, with one line on stderr; the console handlers
    go on.
    """
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is None or stream in (sys.stdout, sys.stderr):
                continue
            handler.handleError = functools.partial(_drop_handler, logger, handler)


def resolve_device(device: Optional[str]) -> str:
    """``train.device``: None means ``"cuda"`` when CUDA is available, else ``"cpu"``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)
