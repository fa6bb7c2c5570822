"""tools/plot_metrics.py on synthetic Detectron2 metrics.json files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dino_d2.cli import plot_metrics as tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_metrics.py")


def _write(path, records, tail=""):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write(tail)
    return str(path)


def _training_log(path):
    """100 logged iterations with losses and lr, an evaluation every 50 iterations, a repeated
    iteration (a resumed run) and a last line cut short (a run still writing)."""
    records = []
    for it in range(0, 200, 2):
        records.append(
            {"iteration": it, "total_loss": 20 * 0.99**it + 1, "loss_class": 1.0 + 0.001 * it,
             "loss_bbox": 0.5, "lr": 1e-4, "data_time": 0.01}
        )  # fmt: skip
        if it % 50 == 48:
            records.append(
                {"iteration": it, "bbox/AP": it / 10, "bbox/AP50": it / 5, "bbox/AP75": it / 20,
                 "bbox/APs": float("nan")}
            )  # fmt: skip
    records.append({"iteration": 198, "total_loss": 1.5})
    return _write(path, records, tail='{"iteration": 200, "total_lo')


def test_writes_a_png_with_both_panels(tmp_path):
    output = tmp_path / "plots" / "curves.png"
    curves = tool.plot_metrics(
        _training_log(tmp_path / "metrics.json"),
        str(output),
        loss_keys=["total_loss", "loss_class"],
    )
    with Image.open(output) as png:
        png.verify()
    with Image.open(output) as png:
        assert png.format == "PNG"
        width, height = png.size
        assert 400 <= width <= 3000 and 400 <= height <= 3000
        assert len(set(np.asarray(png.convert("L")).ravel().tolist())) > 10  # not blank
    assert list(curves) == ["total_loss", "loss_class", "bbox/AP", "bbox/AP50", "bbox/AP75"]
    iterations, values = curves["total_loss"]
    assert len(iterations) == 100 and np.all(np.diff(iterations) > 0)
    assert values[-1] == 1.5  # the later line of a repeated iteration wins
    assert curves["bbox/AP"][0].tolist() == [48, 98, 148, 198]


def test_command_line(tmp_path):
    metrics = _training_log(tmp_path / "metrics.json")
    output = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, TOOL, metrics, "--output", str(output), "--keys", "loss_bbox",
         "--smooth", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "total_loss, loss_bbox, bbox/AP" in result.stdout
    with Image.open(output) as png:
        assert png.format == "PNG"


def test_clear_errors(tmp_path):
    no_keys = _write(
        tmp_path / "timing.json", [{"iteration": i, "data_time": 0.1} for i in range(3)]
    )
    with pytest.raises(
        ValueError, match="none of the keys to plot.*its keys: data_time, iteration"
    ):
        tool.plot_metrics(no_keys, str(tmp_path / "a.png"))
    assert not (tmp_path / "a.png").exists()
    metrics = _training_log(tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="has no loss_nope"):
        tool.plot_metrics(metrics, str(tmp_path / "b.png"), loss_keys=["loss_nope"])
    broken = _write(
        tmp_path / "broken.json", [{"iteration": 0}], tail="oops\n" + '{"iteration": 1}\n'
    )
    with pytest.raises(ValueError, match="line 2: not JSON"):
        tool.load_metrics(broken)
    result = subprocess.run(
        [sys.executable, TOOL, no_keys, "--output", str(tmp_path / "c.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "none of the keys to plot" in result.stderr
    assert "Traceback" not in result.stderr


def test_moving_average_is_centred_and_exact_on_a_line():
    line = np.arange(10, dtype=float)
    smoothed = tool.moving_average(line, 3)
    np.testing.assert_allclose(smoothed[1:-1], line[1:-1])
    assert smoothed[0] == 0.5 and smoothed[-1] == 8.5
    np.testing.assert_array_equal(tool.moving_average(line, 1), line)
    np.testing.assert_allclose(tool.moving_average(np.full(7, 2.5), 100), np.full(7, 2.5))


def test_default_window_keeps_short_runs_readable():
    # The digits demo logs 50 points: a window of 5 (100 iterations), not 20 (400).
    assert [tool.default_window(n) for n in (0, 9, 50, 199, 200, 4500)] == [1, 1, 5, 19, 20, 20]
