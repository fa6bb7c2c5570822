"""Measurements taken in a fresh Python process, which prints them as its last line of JSON.

A fresh process holds nothing of its caller: neither its memory (``ru_maxrss`` of the caller
would not count) nor its thread pools and heap (a runtime timed beside another is slowed by
it). :func:`run_measured_process` runs one and returns what it printed.
"""

import json
import os
import subprocess
from typing import Dict, Sequence, Type

__all__ = ["MeasuredProcessError", "run_measured_process"]

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MeasuredProcessError(RuntimeError):
    """A measured process failed; the message holds its command and the end of its stderr."""


def run_measured_process(
    command: Sequence[str], error: Type[MeasuredProcessError] = MeasuredProcessError
) -> Dict:
    """Runs ``command`` (a Python process) and returns the JSON object of its last stdout line.

    The process imports the same dino_d2 as this one, wherever the current folder is.

    Raises:
        ``error``: the process exited with another code than 0, or printed nothing.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    result = subprocess.run(list(command), capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise error(
            f"the process {' '.join(command)} exited with code {result.returncode}"
            f"{'' if lines else ' and printed nothing'}:\n{result.stderr[-3000:]}"
        )
    return json.loads(lines[-1])
