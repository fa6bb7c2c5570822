"""Weights derived for inference, computed once and reused while their sources are unchanged.

Inference without autograd calls every layer with the same weights: a frozen batch norm folded
into its convolution, or a weight in the precision CPU autocast computes in, need not be derived
again on every call. :func:`derived_weight` keeps them on the module (a plain attribute: not a
parameter or buffer, so the state dict, ``named_parameters()`` and checkpoints are unchanged)
and recomputes them when a source tensor was written in place (its version counter moved,
e.g. ``load_state_dict`` or an optimizer step) or replaced (another storage, e.g. ``.to()``).

Under autograd the caller must not use the cache: gradients have to flow into the sources.
"""

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["autocast_dtype", "derived_weight", "use_derived_weights"]

_CACHE_ATTR = "_derived_weights"


def use_derived_weights() -> bool:
    """Whether a layer may use cached derived weights now: no autograd, and not while
    compiling, exporting or tracing (a cached tensor would become a graph constant)."""
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
    )


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes matrix products in on ``x``'s device type, or None when
    autocast is off there."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _stamp(sources: Sequence[Optional[Tensor]]) -> Tuple:
    return tuple(
        None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in sources
    )


def derived_weight(
    module: nn.Module,
    key: str,
    sources: Sequence[Optional[Tensor]],
    compute: Callable[[], Any],
) -> Any:
    """``compute()``, cached on ``module`` under ``key`` while ``sources`` are unchanged.

    Args:
        module: the layer that owns the sources.
        key: names the derived tensor among the module's others (e.g. ``"weight/bfloat16"``).
        sources: every tensor ``compute`` reads (None entries are allowed and ignored).
        compute: returns the derived tensor (or a tuple of them); called without autograd.
    """
    cache = module.__dict__.setdefault(_CACHE_ATTR, {})
    stamp = _stamp(sources)
    entry = cache.get(key)
    if entry is None or entry[0] != stamp:
        with torch.no_grad():
            entry = (stamp, compute())
        cache[key] = entry
    return entry[1]
