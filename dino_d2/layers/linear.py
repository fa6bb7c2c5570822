"""Linear layers with their bias and ReLU fused, for CPU inference.

PyTorch's ``F.linear`` on the CPU copies the bias into the output before the matrix product and
a ReLU is another pass over the result: for the encoder's FFN at 800x1333 (22k tokens x 2048
channels) those two passes cost about as much as a third of the product itself. oneDNN's
matmul applies both in the same call (``torch.ops.mkldnn._linear_pointwise``, the op
TorchInductor emits for CPU linears). :func:`linear` uses it where it applies (float32 on the
CPU, no autograd, not while compiling, exporting or tracing, oneDNN present) and ``F.linear``
elsewhere; the results agree to float rounding. :func:`onednn_linear` switches it off.
"""

import contextlib
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear", "onednn_linear"]

_enabled = True
_ACTIVATIONS = (None, "relu")


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextlib.contextmanager
def onednn_linear(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`linear` uses oneDNN's fused matmul only if ``enabled``."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def _fused(x: Tensor, weight: Tensor) -> bool:
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and _onednn_available()
    )


def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """``activation(F.linear(x, weight, bias))`` for ``activation`` None or ``"relu"``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: optional (out_features,).
        activation: None, or ``"relu"``.

    Returns:
        (..., out_features).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if _fused(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation or "none", [], "")
    out = F.linear(x, weight, bias)
    if activation == "relu":
        out = F.relu(out, inplace=not torch.is_grad_enabled())
    return out
