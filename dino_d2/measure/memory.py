"""Memory figures of a benchmark: the process's peak resident memory and CUDA's peak allocation."""

import resource
import sys
from typing import Optional

import torch

__all__ = ["peak_rss_mb", "cuda_peak_mb"]


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (building the model counts too).

    On Linux it is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this program's
    memory. ``ru_maxrss`` is kept across ``execve``, so a process started by a large one (a
    benchmark starting a fresh inference process) would report its parent's size at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def cuda_peak_mb(device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB since its last reset; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1024**2
