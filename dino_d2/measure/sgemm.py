"""This machine's matrix-multiply rate and how far an inference is from the limit it sets."""

import statistics
import time
from typing import Dict

import torch
from torch import Tensor

from .flops import count_macs
from .timing import synchronize

__all__ = ["sgemm_gmacs", "matrix_math_limit"]


def sgemm_gmacs(device="cpu", size: int = 4096, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate, in GMAC/s (10^9 multiply-adds a second).

    The median of ``repeats`` timed ``torch.mm`` of two ``size`` x ``size`` matrices (after one
    untimed), with the current thread count: the rate no convolution or linear layer of the same
    precision can beat on this machine.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device)
    b = torch.rand(size, size, generator=generator).to(device)
    seconds = []
    for index in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if index:
            seconds.append(time.perf_counter() - start)
    return size**3 / statistics.median(seconds) / 1e9


def matrix_math_limit(model, image: Tensor, latency_s: float) -> Dict:
    """How far an inference is from this machine's matrix-math limit.

    The limit is the model's multiply-accumulates on ``image`` (fvcore's count,
    :func:`dino_d2.measure.flops.count_macs`) done at :func:`sgemm_gmacs`'s rate.

    Args:
        model: the model in eval mode.
        image: (3, H, W) on the model's device.
        latency_s: the measured seconds per image.

    Returns:
        ``gmacs``, ``sgemm_gmacs_per_s``, ``limit_s`` and ``latency_to_limit`` (the ratio).
    """
    with torch.no_grad():
        macs, _ = count_macs(model, image)
    rate = sgemm_gmacs(image.device)
    limit = macs / 1e9 / rate
    return {
        "gmacs": macs / 1e9,
        "sgemm_gmacs_per_s": rate,
        "limit_s": limit,
        "latency_to_limit": latency_s / limit,
    }
