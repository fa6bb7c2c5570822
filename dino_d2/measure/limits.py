"""Honest matrix-math limits: the fastest GEMM this machine offers, per precision.

A model cannot run faster than its multiply-accumulates (MACs) done at the machine's best
matrix-multiply rate. That rate depends on the library: on the CPU, ``torch.mm`` in float32 goes
through the BLAS PyTorch was built with (OpenBLAS or MKL), which on some CPUs (AMD, with MKL's
generic code path) is slower than oneDNN, which runs the model's convolutions and the fast
path's fused linears. A limit measured with the slower library is one the model can beat.

So every precision is measured with each library that computes it, and the larger rate counts:

* ``blas``: ``torch.mm`` (float32 on the CPU goes to the BLAS; bfloat16 on the CPU goes to
  oneDNN's bf16 matmul inside ``torch.mm``; on CUDA, cuBLAS in every precision);
* ``onednn`` (CPU only, when PyTorch has oneDNN): ``torch.ops.mkldnn._linear_pointwise``, the
  matmul that :class:`dino_d2.layers.fast_path.OneDNNLinear` calls, in float32 and bfloat16.

A rate is ``size ** 3`` MACs over the median of ``repeats`` timed products of two ``size`` x
``size`` matrices (after one untimed), at the current thread count, in GMAC/s (10^9 MACs a
second). The limit of a model is ``MACs / rate`` (fvcore's MACs,
:func:`dino_d2.measure.flops.count_macs`).

Command line (prints the rates and, with ``--config``, the model's limits as JSON)::

    python -m dino_d2.measure.limits
    python -m dino_d2.measure.limits --config configs/dino_r50_4scale_12ep.py --height 800 \\
        --width 1333
"""

import argparse
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "GEMM_LIBRARIES",
    "GemmRate",
    "PrecisionLimit",
    "fastest_gemm",
    "gemm_libraries",
    "gemm_rate",
    "inference_limit",
    "is_native",
    "model_limits",
]

# A GEMM a @ b.T of two (size, size) matrices through one library: the form of a linear layer
# (activations times the transposed weight), which both libraries take without a copy.
Gemm = Callable[[Tensor, Tensor], Tensor]


def _torch_mm(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a, b.t())


def _onednn_matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# Every library, by name; gemm_libraries() says which run on a device.
GEMM_LIBRARIES: Dict[str, Gemm] = {"blas": _torch_mm, "onednn": _onednn_matmul}


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm_libraries(device, dtype: torch.dtype = torch.float32) -> Sequence[str]:
    """Names of the :data:`GEMM_LIBRARIES` that compute ``dtype`` on ``device`` (``blas``:
    torch.mm, always; ``onednn``: on the CPU when PyTorch has oneDNN and oneDNN computes
    ``dtype`` on this CPU: bfloat16 needs AVX-512 at least, see
    :func:`dino_d2.layers.fast_path.onednn_bfloat16_available`)."""
    if torch.device(device).type != "cpu" or not _onednn_available():
        return ("blas",)
    if dtype == torch.bfloat16:
        from dino_d2.layers.fast_path import onednn_bfloat16_available

        if not onednn_bfloat16_available():
            return ("blas",)
    elif dtype != torch.float32:
        return ("blas",)
    return ("blas", "onednn")


def is_native(dtype: torch.dtype, device="cpu") -> bool:
    """Whether ``device`` computes ``dtype`` products in hardware: float32 everywhere, bfloat16
    where :func:`dino_d2.engine.precision.bfloat16_is_native` says so, float16 on CUDA. A rate in
    a precision that is not native is that of its emulation."""
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        from dino_d2.engine.precision import bfloat16_is_native

        return bfloat16_is_native(device)
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class GemmRate:
    """One measured rate.

    Attributes:
        library: a key of :data:`GEMM_LIBRARIES`.
        dtype: the precision, as torch names it (``"float32"``, ``"bfloat16"``).
        gmacs_per_s: 10^9 multiply-adds a second.
    """

    library: str
    dtype: str
    gmacs_per_s: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(
    library: str, dtype: torch.dtype, device="cpu", *, size: int = 2048, repeats: int = 5
) -> GemmRate:
    """The rate of ``library``'s product of two ``size`` x ``size`` ``dtype`` matrices.

    Raises:
        KeyError: an unknown library (the message lists the known ones).
        ValueError: ``size`` or ``repeats`` below 1.
    """
    if library not in GEMM_LIBRARIES:
        raise KeyError(f"unknown GEMM library {library!r}; known: {sorted(GEMM_LIBRARIES)}")
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be at least 1, got {size} and {repeats}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    gemm = GEMM_LIBRARIES[library]
    seconds = []
    with torch.no_grad():
        for index in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            gemm(a, b)
            _synchronize(device)
            if index:
                seconds.append(time.perf_counter() - start)
    return GemmRate(
        library, str(dtype).removeprefix("torch."), size**3 / statistics.median(seconds) / 1e9
    )


def fastest_gemm(
    dtype: torch.dtype, device="cpu", *, size: int = 2048, repeats: int = 5
) -> Dict[str, object]:
    """Every library's rate for ``dtype`` on ``device`` and the larger one.

    Returns:
        ``{"rates": {library: GMAC/s, ...}, "library": the fastest, "gmacs_per_s": its rate,
        "native": whether the rate is the hardware's, not an emulation's (:func:`is_native`)}``.
    """
    rates = {
        name: gemm_rate(name, dtype, device, size=size, repeats=repeats).gmacs_per_s
        for name in gemm_libraries(device, dtype)
    }
    best = max(rates, key=rates.get)
    return {
        "rates": rates,
        "library": best,
        "gmacs_per_s": rates[best],
        "native": is_native(dtype, device),
    }


@dataclass(frozen=True)
class PrecisionLimit:
    """The matrix-math limit of one model inference in one precision.

    Attributes:
        dtype: the precision (``"float32"``, ``"bfloat16"``).
        gmacs: the model's MACs (10^9), fvcore's count.
        library: the fastest library for this precision.
        gmacs_per_s: its rate.
        rates: every library's rate (GMAC/s).
        limit_s: ``gmacs / gmacs_per_s``, seconds.
        native: whether the device computes this precision in hardware (:func:`is_native`);
            False: the rate and limit are those of an emulation (bfloat16 on a CPU without
            AVX512-BF16 or AMX), slower than float32.
    """

    dtype: str
    gmacs: float
    library: str
    gmacs_per_s: float
    rates: Dict[str, float]
    limit_s: float
    native: bool = True


def model_limits(
    gmacs: float,
    device="cpu",
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    *,
    size: int = 2048,
    repeats: int = 5,
) -> Dict[str, PrecisionLimit]:
    """The limit of ``gmacs`` 10^9 MACs in each of ``dtypes`` on ``device``.

    Args:
        gmacs: the MACs of one inference, in 10^9 (``count_macs(model, image)[0] / 1e9``).
        device: where the rates are measured.
        dtypes: the precisions.

    Returns:
        ``{"float32": PrecisionLimit, "bfloat16": ...}``.
    """
    if not gmacs > 0:
        raise ValueError(f"gmacs must be positive, got {gmacs}")
    limits = {}
    for dtype in dtypes:
        best = fastest_gemm(dtype, device, size=size, repeats=repeats)
        name = str(dtype).removeprefix("torch.")
        limits[name] = PrecisionLimit(
            name,
            gmacs,
            best["library"],
            best["gmacs_per_s"],
            best["rates"],
            gmacs / best["gmacs_per_s"],
            is_native(dtype, device),
        )
    return limits


def inference_limit(
    model, image: Tensor, latency_s: float, dtype: Optional[torch.dtype] = None
) -> Dict:
    """How far one inference is from this machine's matrix-math limit in its precision.

    The model's multiply-accumulates on ``image`` (fvcore's count,
    :func:`dino_d2.measure.flops.count_macs`) at the fastest GEMM rate of each precision
    (:func:`model_limits`, float32 and bfloat16); the latency is held against the limit of the
    precision it ran in.

    Args:
        model: the model in eval mode.
        image: (3, H, W) on the model's device.
        latency_s: the measured seconds per image.
        dtype: the autocast dtype the latency was measured under (None: float32).

    Returns:
        ``gmacs``, ``precision``, ``gemm_library`` and ``gemm_gmacs_per_s`` (the fastest GEMM in
        that precision), ``limit_s``, ``latency_to_limit`` (the ratio), and ``limits``: per
        precision, ``{"library", "gmacs_per_s", "rates", "limit_s", "native"}``.
    """
    from .flops import count_macs

    with torch.no_grad():
        macs, _ = count_macs(model, image)
    gmacs = macs / 1e9
    limits = model_limits(gmacs, image.device)
    precision = str(dtype or torch.float32).removeprefix("torch.")
    if precision not in limits:
        limits.update(model_limits(gmacs, image.device, (dtype,)))
    own = limits[precision]
    return {
        "gmacs": gmacs,
        "precision": precision,
        "gemm_library": own.library,
        "gemm_gmacs_per_s": own.gmacs_per_s,
        "limit_s": own.limit_s,
        "latency_to_limit": latency_s / own.limit_s,
        "limits": {
            name: {
                key: value for key, value in asdict(limit).items() if key not in ("dtype", "gmacs")
            }
            for name, limit in limits.items()
        },
    }


def _model_gmacs(config: str, height: int, width: int) -> float:
    from detectron2.config import instantiate

    from .flops import count_macs
    from ..layers.fast_path import optimized_copy
    from ..model_zoo import load_config_file

    model = optimized_copy(instantiate(load_config_file(config).model))
    image = torch.randint(256, (3, height, width)).float()
    with torch.no_grad():
        macs, _ = count_macs(model, image)
    return macs / 1e9


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a model config: also print its MACs and limits")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--size", type=int, default=2048, help="matrix side of the GEMMs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.config:
        gmacs = _model_gmacs(args.config, args.height, args.width)
        result = {
            name: asdict(limit)
            for name, limit in model_limits(gmacs, size=args.size, repeats=args.repeats).items()
        }
    else:
        result = {
            str(dtype).removeprefix("torch."): fastest_gemm(
                dtype, size=args.size, repeats=args.repeats
            )
            for dtype in (torch.float32, torch.bfloat16)
        }
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
