"""Runtimes timed alone in fresh processes, alternated round by round."""

import json
import sys

import pytest

from dino_d2.measure import AlternationError, MeasuredProcessError, alternate


def _runtime(log, name, latencies):
    """A command that appends its name to ``log`` and prints its next latency from the list."""
    script = (
        "import json, sys\n"
        "log, name, latencies = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "runs = open(log).read().split() if __import__('os').path.exists(log) else []\n"
        "open(log, 'a').write(name + ' ')\n"
        "print('progress')\n"
        "print(json.dumps({'latency_ms_median': latencies[runs.count(name)]}))\n"
    )
    return [sys.executable, "-c", script, str(log), name, json.dumps(latencies)]


def test_each_runtime_against_the_reference_of_its_round(tmp_path):
    log = tmp_path / "order.txt"
    commands = {
        "eager": _runtime(log, "eager", [100.0, 200.0, 100.0]),
        "onnx": _runtime(log, "onnx", [50.0, 300.0, 90.0]),
        "ov": _runtime(log, "ov", [100.0, 100.0, 100.0]),
    }
    result = alternate(commands, rounds=3)
    # Round by round, the reference first: a drift of the machine hits all alike.
    assert log.read_text().split() == ["eager", "onnx", "ov"] * 3
    assert result["rounds"] == 3 and result["reference"] == "eager"
    assert result["reference_latency_ms_median"] == [100.0, 200.0, 100.0]
    onnx, ov = result["runtimes"]["onnx"], result["runtimes"]["ov"]
    assert onnx["latency_ms_median"] == [50.0, 300.0, 90.0]
    assert onnx["ratio_per_round"] == pytest.approx([0.5, 1.5, 0.9])
    assert onnx["ratio_median"] == pytest.approx(0.9)
    assert ov["ratio_per_round"] == pytest.approx([1.0, 0.5, 1.0])
    assert set(result["runtimes"]) == {"onnx", "ov"}


def test_a_failed_runtime_is_named_with_its_error(tmp_path):
    failing = [sys.executable, "-c", "import sys; sys.exit('no such export: model.onnx')"]
    commands = {"eager": _runtime(tmp_path / "log", "eager", [1.0]), "onnx": failing}
    with pytest.raises(AlternationError, match=r"(?s)onnx, timed alone: .*code 1.*model\.onnx"):
        alternate(commands, rounds=1)
    silent = [sys.executable, "-c", "pass"]
    with pytest.raises(MeasuredProcessError, match="printed nothing"):
        alternate({"eager": silent, "onnx": silent}, rounds=1)


@pytest.mark.parametrize("commands, rounds", [({"eager": ["x"]}, 1), ({"a": [], "b": []}, 0)])
def test_needs_two_runtimes_and_a_round(commands, rounds):
    with pytest.raises(ValueError, match="reference and at least one other runtime"):
        alternate(commands, rounds)
