"""A DINO that fails on purpose in one process, for the failure tests of the training script.

Used from the command line: ``model._target_=faulty_dino.FaultyDINO model.fail_rank=1
model.fail_call=3 model.failure=raise`` (or ``non_finite``, or ``kill``): the ``fail_call``-th
training forward pass of the process of rank ``fail_rank`` raises, returns NaN losses (which
the trainer's check turns into a FloatingPointError) or kills its process (SIGKILL). With
``model.fail_attempt=N`` only in the N-th run of a job that torchrun restarts
(``TORCHELASTIC_RESTART_COUNT``, 0 without torchrun). Everything else is DINO's.
"""

import os
import signal

from detectron2.utils import comm

from dino_d2.modeling import DINO

__all__ = ["FaultyDINO"]


class FaultyDINO(DINO):
    def __init__(
        self,
        *,
        fail_rank: int = -1,
        fail_call: int = -1,
        failure: str = "raise",
        fail_attempt: int = 0,
        **kw,
    ):
        super().__init__(**kw)
        if failure not in ("raise", "non_finite", "kill"):
            raise ValueError(f"failure must be 'raise', 'non_finite' or 'kill', got {failure!r}")
        self.fail_rank, self.fail_call, self.failure = fail_rank, fail_call, failure
        self.fail_attempt = fail_attempt
        self.calls = 0

    def forward(self, batched_inputs):
        output = super().forward(batched_inputs)
        if not self.training:
            return output
        self.calls += 1
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if (comm.get_rank(), self.calls, attempt) != (
            self.fail_rank,
            self.fail_call,
            self.fail_attempt,
        ):
            return output
        if self.failure == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.failure == "non_finite":
            return {name: loss * float("nan") for name, loss in output.items()}
        raise RuntimeError(f"injected failure in rank {self.fail_rank} at call {self.calls}")
