"""Runtimes timed alone, each in a fresh process, alternated round by round.

Two runtimes timed side by side in one process slow each other (their thread pools and heaps
stay), and the speed of a 2-core VM drifts by up to 20% between the blocks of one process. So
:func:`alternate` runs each runtime's command alone in a fresh process, the first (the
reference) and then the others, for a number of rounds, and compares each runtime with the
reference of the same round::

    alternate({"eager": [...], "onnxruntime": [...]}, rounds=3)

Each command prints one JSON line with its ``latency_ms_median`` (``tools/benchmark.py
--only RUNTIME`` does).
"""

import logging
import statistics
from typing import Dict, Mapping, Sequence

from .processes import MeasuredProcessError, run_measured_process

__all__ = ["AlternationError", "alternate"]

logger = logging.getLogger(__name__)


class AlternationError(MeasuredProcessError):
    """A runtime's process failed; the message names the runtime and holds its stderr's end."""


def alternate(commands: Mapping[str, Sequence[str]], rounds: int) -> Dict:
    """Runs each command alone, in order, ``rounds`` times over.

    Args:
        commands: runtime name -> the command that times it; the first is the reference.
        rounds: how many times each command runs.

    Returns:
        ``rounds``, ``reference`` (its name), ``reference_latency_ms_median`` (a latency per
        round) and ``runtimes``: for each other runtime its ``latency_ms_median`` per round, its
        ``ratio_per_round`` to the reference of the same round and their median
        ``ratio_median``.

    Raises:
        ValueError: fewer than two commands, or ``rounds`` below 1.
        AlternationError: a command failed.
    """
    if len(commands) < 2 or rounds < 1:
        raise ValueError(
            f"alternate needs a reference and at least one other runtime, and rounds >= 1; "
            f"got {list(commands)} and rounds={rounds}"
        )
    latencies = {name: [] for name in commands}
    for round_index in range(rounds):
        for name, command in commands.items():
            logger.info(f"Alternation {round_index + 1}/{rounds}: {name} alone")
            try:
                result = run_measured_process(command, AlternationError)
            except AlternationError as error:
                raise AlternationError(f"{name}, timed alone: {error}") from None
            latencies[name].append(result["latency_ms_median"])
    reference, *others = commands
    runtimes = {}
    for name in others:
        ratios = [ms / ref_ms for ms, ref_ms in zip(latencies[name], latencies[reference])]
        runtimes[name] = {
            "latency_ms_median": latencies[name],
            "ratio_per_round": ratios,
            "ratio_median": statistics.median(ratios),
        }
    return {
        "rounds": rounds,
        "reference": reference,
        "reference_latency_ms_median": latencies[reference],
        "runtimes": runtimes,
    }
