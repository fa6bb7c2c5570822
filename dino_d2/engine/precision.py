"""Which precision a device computes in: mixed precision for training (``train.amp.precision``)
and for inference (``train.amp.eval_precision``), resolved the same way ("auto": bfloat16 where
the device computes it natively, float32 elsewhere). Imports only torch, so inference code can
use it without the training engine."""

import contextlib
from typing import ContextManager, Optional, Tuple

import torch

from .defaults import resolve_device

__all__ = ["amp_settings", "bfloat16_is_native", "inference_autocast", "inference_dtype"]

_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def bfloat16_is_native(device=None) -> bool:
    """Whether ``device`` (default: CUDA when available, else the CPU, as ``train.device=None``
    resolves) computes bfloat16 matrix products in hardware, so that bfloat16 autocast is faster
    than float32 there.

    On the CPU that takes the AVX512-BF16 or AMX instructions (PyTorch's cpuinfo checks,
    ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``): without them oneDNN
    emulates bfloat16, more slowly than float32. On CUDA it is ``torch.cuda.is_bf16_supported()``
    (Ampere and later).
    """
    device = torch.device(resolve_device(device))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_settings(
    device: torch.device, precision: Optional[str] = None
) -> Tuple[Optional[torch.dtype], Optional[torch.amp.GradScaler]]:
    """The autocast dtype (None: float32) and the GradScaler (or None) for ``train.amp`` on
    ``device``, when ``train.amp.enabled`` is true.

    Args:
        device: the model's device.
        precision: ``train.amp.precision``: "auto" (the default of configs/common/train.py),
            "bfloat16", "float16", or None.

            * "auto": bfloat16 where ``device`` computes it natively
              (:func:`bfloat16_is_native`: AVX512-BF16 or AMX on the CPU, Ampere or later on
              CUDA), float32 (a None dtype) elsewhere, where bfloat16 autocast is slower than
              float32;
            * "bfloat16" / "float16": that precision, wherever it runs. float16 needs a
              GradScaler (it is only offered on CUDA); bfloat16 has float32's range and is used
              without one;
            * None: float16 on CUDA, bfloat16 elsewhere.

    Raises:
        ValueError: an unknown precision, float16 off CUDA, bfloat16 on a GPU without it, or
            a device without autocast.
    """
    device = torch.device(device)
    if precision == "auto":
        if not bfloat16_is_native(device):
            return None, None
        precision = "bfloat16"
    if precision is None:
        precision = "float16" if device.type == "cuda" else "bfloat16"
    if precision not in _PRECISIONS:
        raise ValueError(
            f"train.amp.precision must be 'auto' or one of {sorted(_PRECISIONS)}, "
            f"got {precision!r}"
        )
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"mixed precision: PyTorch has no autocast for {device.type} devices")
    dtype = _PRECISIONS[precision]
    if dtype == torch.float16:
        if device.type != "cuda":
            raise ValueError(
                f"mixed precision with float16 needs CUDA (it is on {device}); "
                "use train.amp.precision=bfloat16 or train.amp.enabled=False"
            )
        return dtype, torch.amp.GradScaler("cuda")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16; use train.amp.precision=float16")
    return dtype, None


def inference_dtype(device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype inference runs under for ``train.amp.eval_precision`` on ``device``
    (None: float32).

    Args:
        device: the model's device.
        precision: "float32", or "auto" / "bfloat16" / "float16" as :func:`amp_settings` reads
            them ("auto": bfloat16 where ``device`` computes it natively, else float32).

    Raises:
        ValueError: as :func:`amp_settings`, naming ``train.amp.eval_precision``.
    """
    if precision == "float32":
        return None
    try:
        return amp_settings(device, precision)[0]
    except ValueError as e:
        raise ValueError(f"train.amp.eval_precision={precision!r}: {e}") from e


def inference_autocast(device, precision: str) -> ContextManager:
    """A context in which inference on ``device`` runs in ``precision`` (see
    :func:`inference_dtype`): CPU or CUDA autocast, or nothing for float32. The inference fast
    path (:func:`dino_d2.layers.fast_path.optimize_for_cpu_inference`) holds under it."""
    dtype = inference_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
