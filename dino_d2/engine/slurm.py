"""A training run as a submitit job that requeues itself and resumes.

submitit runs :class:`TrainingJob` in every task of a SLURM job (one task per GPU). The job
exports torch's variables from submitit's view of the job (``TorchDistributedEnvironment``), so
that :func:`dino_d2.engine.launch.launch` joins it as it joins a torchrun job. When SLURM
pre-empts the job or its time runs out, submitit calls :meth:`TrainingJob.checkpoint`, which
returns the same run marked as requeued: the requeued job sets ``DINO_D2_RESUME=1``
(:data:`dino_d2.engine.job_env.RESUME_ENV`) and the training script resumes from the last
checkpoint of its output folder (checkpoints are written atomically, so the last complete one is
there whatever the moment of the stop).
"""

import os
from typing import Any, Callable, Optional, Sequence

from .job_env import RESUME_ENV

__all__ = ["TrainingJob"]


class TrainingJob:
    """``main(argv)`` as a submitit job (picklable: ``main`` must be a module-level function).

    Args:
        main: the training entry, e.g. :func:`dino_d2.cli.train_net.invoke_main`.
        argv: its command line (``--config-file ...`` and overrides).
        requeued: True in a job that :meth:`checkpoint` resubmitted.
    """

    def __init__(self, main: Callable[[Sequence[str]], Any], argv: Sequence[str], requeued=False):
        self.main = main
        self.argv = list(argv)
        self.requeued = requeued

    def __call__(self) -> Any:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks > 1:
            # CUDA_VISIBLE_DEVICES stays: the process selects its GPU by its local rank.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.requeued:
            os.environ[RESUME_ENV] = "1"
        return self.main(self.argv)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        """Called by submitit on pre-emption or timeout: the same run, requeued to resume."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainingJob(self.main, self.argv, requeued=True))
