"""Parts of a mixed-precision model that stay in float32.

Under autocast a model's matrix products run in bfloat16 (or float16). Some parts need float32's
8 more mantissa bits: the box refinement (a small delta added to a box logit; the D-FINE ports
keep their box heads in float32 for AMP NaNs), the Hungarian matching (costs compared across
queries) and the losses (sums over thousands of queries). :func:`in_float32` runs such a part
with autocast off and its floating-point inputs in float32; without autocast it only calls it,
so inference in float32, tracing and export see the plain call.

The rest of an inference under autocast runs in the lower precision end to end:
:func:`inference_activations` converts the activations entering the encoder and the decoder once
(the position embeddings, the decoder's initial queries), so that their residual adds and
LayerNorms stay in bfloat16 and no linear layer converts its input again on every call.
PyTorch's CPU LayerNorm on bfloat16 input keeps its statistics in float32 (see the tests).
"""

from typing import Any, Callable, Tuple

import torch
from torch import Tensor

from .inference_weights import autocast_dtype, use_derived_weights

__all__ = ["autocast_on", "in_float32", "inference_activations"]


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


def inference_activations(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """``tensors``, each float32 one converted to the dtype autocast computes in, at inference.

    Under autocast a float32 activation (e.g. a position embedding computed in float32) makes
    every residual add it enters float32, and every linear layer it reaches converts it back to
    bfloat16 on every call. Converted once where it enters the encoder or decoder, the stream
    stays in the lower precision. Only at inference (no autograd, not tracing or exporting, see
    :func:`~dino_d2.layers.inference_weights.use_derived_weights`): training keeps autocast's
    float32 residual stream, and without autocast nothing changes.

    Returns:
        a tuple with one tensor per argument, in the same order.
    """
    if not tensors or not use_derived_weights():
        return tensors
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)
