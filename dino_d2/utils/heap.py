"""Keep freed memory in the process's heap, so that large tensors are not page-faulted in anew.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. PyTorch's CPU allocator has no cache, so
every large activation (a 17000 x 2048 FFN hidden state is 70 MB in bfloat16) costs one page
fault per 4 KiB page, on every layer of every iteration. On the 2-core development machine (under
load, one thread) adding two such bfloat16 tensors took 115 ms with fresh pages and 10 ms with
reused ones, and the copies and ReLUs of a bfloat16 DINO-R50 training step fell from 22% to 5%
of its profile: the faults cost the same in both precisions, so they weigh most where the
matrix products are fast.

:func:`keep_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap) and
``M_TRIM_THRESHOLD`` to its largest value (freed memory is kept for reuse, not returned), with
``mallopt`` at run time: the role jemalloc or tcmalloc play when preloaded (``LD_PRELOAD``),
without a preload. The process's resident memory then stays at its peak instead of following
its current use, and the peak may grow by fragmentation (DINO-R50 training step, batch 2 at
640 px: 3.9-4.2 GB in bfloat16 against 3.8-4.0 GB without, 5.8 against 5.4 GB in float32).
The training script and ``tools/benchmark.py --train`` call it; inference does not. Elsewhere
(another C library, or ``DINO_D2_KEEP_FREED_MEMORY=0``) nothing changes and the function says
so.
"""

import ctypes
import ctypes.util
import logging
import os

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

# glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_ENV = "DINO_D2_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory for reuse (see the module docstring); call it
    once, early in a process (before the model is built).

    Returns:
        whether the setting took effect: False with another C library, or when the environment
        variable ``DINO_D2_KEEP_FREED_MEMORY`` is ``0`` (both logged).
    """
    if os.environ.get(_ENV, "1") == "0":
        logger.info(f"{_ENV}=0: freed memory goes back to the system (malloc's default)")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info(f"C library {name!r} has no mallopt: freed memory goes back to the system")
        return False
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not applied:
        logger.info("mallopt refused the settings: freed memory goes back to the system")
    return applied
