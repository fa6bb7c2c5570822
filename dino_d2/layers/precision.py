"""Parts of a mixed-precision model that stay in float32.

Under autocast a model's matrix products run in bfloat16 (or float16). Some parts need float32's
8 more mantissa bits: the box refinement (a small delta added to a box logit; the D-FINE ports
keep their box heads in float32 for AMP NaNs), the Hungarian matching (costs compared across
queries) and the losses (sums over thousands of queries). :func:`in_float32` runs such a part
with autocast off and its floating-point inputs in float32; without autocast it only calls it,
so inference in float32, tracing and export see the plain call.
"""

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["autocast_on", "in_float32"]


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type."""
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _widened(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    return value


def in_float32(fn: Callable[..., Any], x: Tensor, *args: Any) -> Any:
    """``fn(x, *args)``, in float32 when autocast is on for ``x``'s device.

    With autocast on, autocast is turned off around the call and every bfloat16 / float16
    tensor among ``x`` and ``args`` is converted to float32 first (other arguments are passed
    as they are). The result is then float32 where a lower-precision call would have given
    bfloat16 / float16, and gradients flow back through the conversions.
    """
    if not autocast_on(x):
        return fn(x, *args)
    with torch.autocast(x.device.type, enabled=False):
        return fn(_widened(x), *(_widened(a) for a in args))
