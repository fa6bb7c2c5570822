"""Box helpers that torchvision.ops does not provide.

Conversions and IoUs come from ``torchvision.ops`` (``box_convert``, ``box_iou``,
``generalized_box_iou``); this module only holds the logit-space helper of iterative box
refinement.
"""

import torch

__all__ = ["inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The logit ``log(x / (1 - x))``, clamped the way the DINO authors clamp it.

    ``x`` is first clamped to [0, 1]; then numerator and denominator are each clamped from below
    by ``eps``, so the result lies in ``[log(eps), -log(eps)]`` (about +-6.9 for the default) and
    its gradient is zero wherever a clamp is active.

    Args:
        x: tensor of probabilities / normalized coordinates.
        eps: lower bound for ``x`` and ``1 - x``.

    Returns:
        Tensor of the same shape and dtype.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
