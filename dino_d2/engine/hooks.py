"""Detectron2's ``EvalHook``, without the final evaluation after a failed last iteration.

Detectron2's ``EvalHook.after_train`` evaluates when ``trainer.iter + 1 >= max_iter``, a test
meant to skip the final evaluation after a failed run. It also holds when the last iteration
itself failed (``iter == max_iter - 1``): the failing process then starts an evaluation, whose
collective operations wait for processes that are still in the failed step's, and the job hangs
until the collective timeout. :class:`EvalHook` evaluates in ``after_train`` only when the
training loop completed (``trainer.iter >= max_iter``, the loop's value after its last step).
"""

from detectron2.engine.hooks import EvalHook as _DetectronEvalHook

__all__ = ["EvalHook"]


class EvalHook(_DetectronEvalHook):
    """Detectron2's ``EvalHook`` (same arguments); see the module docstring."""

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:
            super().after_train()
            return
        # As Detectron2's after_train: the function may hold the trainer in a closure.
        del self._func
