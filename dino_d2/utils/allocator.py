"""glibc ``malloc``'s handling of large freed blocks, set for the kind of process at hand.

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps
it on free; by default it raises that threshold to the size of each such block freed (up to
32 MiB). PyTorch's CPU allocator has no cache of its own, so this choice decides two things a
DINO process feels:

* **Peak memory (inference).** With the moving threshold, later tensors of a few MiB to 32 MiB
  (at 800x1333 every (tokens, 256) float32 map of the encoder is about 23 MiB) come from the
  heap, freed heap memory is reused only where a later request fits, and the peak grows with
  the fragments: DINO-R50's inference at 800x1333 peaked about 200 MiB higher than with a fixed
  threshold. :func:`unmap_large_blocks` fixes the threshold (``MALLOC_MMAP_THRESHOLD_`` in the
  environment does the same for any process). The demo and the inference-memory probe use it.
* **Page faults (training).** Every block above the threshold is mapped afresh and costs one
  page fault per 4 KiB page, on every layer of every iteration: on the 2-core development machine
  (under load, one thread) adding two 17000 x 2048 bfloat16 tensors took 115 ms with fresh pages
  and 10 ms with reused ones, and the copies and ReLUs of a bfloat16 DINO-R50 training step fell
  from 22% to 5% of its profile. :func:`keep_freed_memory` serves every block from the heap
  (``M_MMAP_MAX`` 0) and never trims it (``M_TRIM_THRESHOLD`` at its largest): what jemalloc or
  tcmalloc do when preloaded. Resident memory then stays at its peak, and the peak may grow by
  fragmentation (DINO-R50 training step, batch 2 at 640 px: 3.9 GB in bfloat16 either way, 5.8
  against 5.4 GB in float32). The training script and ``tools/benchmark.py --train`` use it;
  ``DINO_D2_KEEP_FREED_MEMORY=0`` turns it off.

Each changes the whole process's allocator: call one, once, early in a process's ``main``.
Elsewhere than glibc both do nothing and say so.
"""

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Optional

__all__ = ["M_MMAP_THRESHOLD", "keep_freed_memory", "unmap_large_blocks"]

logger = logging.getLogger(__name__)

# glibc's malloc.h: mallopt's parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_KEEP_ENV = "DINO_D2_KEEP_FREED_MEMORY"


def _glibc_mallopt() -> Optional[ctypes._CFuncPtr]:
    """glibc's ``mallopt``, or None where the C library is not glibc (or not found)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc.mallopt


def unmap_large_blocks(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` with its own mapping, returned to
    the system when freed (``mallopt(M_MMAP_THRESHOLD, ...)``, which also stops glibc from
    raising the threshold as blocks are freed). For inference processes (see the module
    docstring).

    Args:
        threshold_bytes: the fixed threshold, in bytes; glibc accepts at most 32 MiB.

    Returns:
        True when glibc took the setting, False where there is no glibc (or it refused).

    Raises:
        ValueError: ``threshold_bytes`` is not in 1 .. 32 MiB.
    """
    if not 0 < threshold_bytes <= 32 << 20:
        raise ValueError(
            f"threshold_bytes must be in 1 .. {32 << 20} (32 MiB), got {threshold_bytes}"
        )
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    accepted = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1
    if not accepted:
        logger.warning(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold_bytes})")
    return accepted


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap for reuse, large blocks included (see the
    module docstring). For training processes; call it before the model is built.

    Returns:
        whether the setting took effect: False without glibc, or when the environment variable
        ``DINO_D2_KEEP_FREED_MEMORY`` is ``0`` (both logged).
    """
    if os.environ.get(_KEEP_ENV, "1") == "0":
        logger.info(f"{_KEEP_ENV}=0: freed memory goes back to the system (malloc's default)")
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.info("the C library is not glibc: freed memory goes back to the system")
        return False
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not applied:
        logger.info("mallopt refused the settings: freed memory goes back to the system")
    return applied
