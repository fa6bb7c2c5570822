"""A busy machine on demand: processes that keep cores busy, as another user's jobs would."""

import contextlib
import subprocess
import sys
import time
from typing import Iterator, List

__all__ = ["busy_cpu"]


# Spins until its parent is gone, so that a killed benchmark leaves no busy process behind.
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextlib.contextmanager
def busy_cpu(num_processes: int = 1, settle_s: float = 0.5) -> Iterator[List[int]]:
    """Keeps ``num_processes`` cores busy with spinning Python processes while inside.

    The processes are ordinary, unpinned and of normal priority, as another user's job would be;
    they are killed on exit, also when the body raises.

    Args:
        num_processes: number of spinning processes (each takes one core).
        settle_s: seconds to wait after starting them, so that they run before the body starts.

    Yields:
        their process ids.
    """
    processes = [
        subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
        for _ in range(num_processes)
    ]
    try:
        time.sleep(settle_s)
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"the busy process exited with code {process.returncode}")
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
