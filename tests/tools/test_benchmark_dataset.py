"""tools/benchmark_dataset.py's measurements, run in this process at a tiny size (the script
runs each in a fresh process): conversion, start-up and reads, the memory job's phases."""

import queue
import threading

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.cli import benchmark_dataset
from dino_d2.data import synthetic


@pytest.fixture
def json_file(tmp_path):
    path = tmp_path / "o365.json"
    synthetic.write_synthetic_coco(str(path), num_images=40, num_classes=10)
    yield str(path)
    if benchmark_dataset._NAME in DatasetCatalog.list():
        DatasetCatalog.remove(benchmark_dataset._NAME)
        MetadataCatalog.remove(benchmark_dataset._NAME)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "json"])
def test_measurements(json_file, tmp_path, cache):
    results = queue.Queue()
    if cache:
        benchmark_dataset._convert(json_file, results)
        converted = results.get()
        assert converted["convert_peak_rss_mb"] >= converted["convert_imports_rss_mb"] > 0
    benchmark_dataset._speed(json_file, str(tmp_path), cache, 50, results)
    speed = results.get()
    assert speed["records_per_s"] > 0 and speed["startup_s"] > 0
    benchmark_dataset._rank(json_file, str(tmp_path), cache, 20, 1, threading.Barrier(1), results)
    memory = results.get()
    for phase in ("empty", "dataset"):
        before, after, touched = memory[phase]
        assert len(before) == len(after) == 2  # the rank and its worker
    # Every page of the dataset's memory was read, in the worker and in the rank.
    assert memory["dataset"][2] > 0 and memory["empty"][2] == 0


def test_table_lists_every_figure_with_its_target():
    columns = {"cache": {"records_per_s": 12345.6, "added_pss_mb": 12.0}, "json path": {}}
    table = benchmark_dataset._table(columns).splitlines()
    assert table[0].split() == ["cache", "json", "path", "target"]
    row = next(line for line in table if line.startswith("records per second"))
    assert "12,346" in row and row.endswith(">= 10000") and " - " in row
    assert len(table) == 1 + len(benchmark_dataset._ROWS)
