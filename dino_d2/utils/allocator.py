"""How the C allocator hands large freed blocks back to the system, for inference processes.

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps
it on free, but it raises that threshold to the size of each such block freed (up to 32 MiB), so
that later tensors of a few MiB to 32 MiB (at 800x1333, every (tokens, 256) float32 map of the
encoder is about 23 MiB) come from the heap. Freed heap memory is kept and reused only where a
later request fits, and the process's peak resident memory grows with the fragments: DINO-R50's
inference at 800x1333 peaked about 200 MiB higher with the moving threshold than with a fixed
one. :func:`unmap_large_blocks` fixes the threshold; ``MALLOC_MMAP_THRESHOLD_`` in the
environment does the same for any process.
"""

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["M_MMAP_THRESHOLD", "unmap_large_blocks"]

logger = logging.getLogger(__name__)

# glibc's malloc.h: the mallopt parameter of the mmap threshold.
M_MMAP_THRESHOLD = -3


def unmap_large_blocks(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` with its own mapping, returned to
    the system when freed (glibc's ``mallopt(M_MMAP_THRESHOLD, ...)``, which also stops glibc
    from raising the threshold as blocks are freed).

    Meant for an inference process, once, before the model runs: it changes the whole process's
    allocator. Elsewhere than Linux with glibc it does nothing.

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
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    accepted = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1
    if not accepted:
        logger.warning(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold_bytes})")
    return accepted
