"""tools/benchmark.py with a tiny DINO on the CPU: random inputs and a registered test set."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from detectron2.config import LazyConfig

from dino_d2.data import generate_digits_dataset, register_digits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "benchmark.py")

KEYS = {
    "config", "device", "input", "batch_size", "num_iter", "warmup", "torch_threads",
    "latency_ms_median", "latency_ms_mean", "latency_ms_min", "images_per_s",
    "cuda_max_memory_allocated_mb", "peak_rss_mb", "rss_mb",
}  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path, tiny_dino_config):
    """The tiny DINO of tests/conftest.py, saved as yaml."""
    cfg = tiny_dino_config()
    cfg.dataloader.test.num_workers = 0
    path = str(tmp_path / "tiny.yaml")
    LazyConfig.save(cfg, path)
    return path


def test_json_line_on_random_inputs(tiny_config):
    command = [
        sys.executable, TOOL, "--config-file", tiny_config, "--height", "64", "--width", "96",
        "--num-iter", "2", "--warmup", "1", "--json", "train.device=cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # progress goes to stderr
    results = json.loads(lines[0])
    assert set(results) == KEYS
    assert results["device"] == "cpu" and results["input"] == "random 64x96"
    assert results["num_iter"] == 2 and results["batch_size"] == 1
    assert results["cuda_max_memory_allocated_mb"] is None
    assert 0 < results["latency_ms_min"] <= results["latency_ms_median"]
    assert results["peak_rss_mb"] >= results["rss_mb"] * 0.99 > 0
    assert "iteration 2/2" in result.stderr and "warm-up 1/1" in result.stderr


def test_test_set_inputs_in_batches(tiny_config, tmp_path, capsys):
    """--dataset reads the first images of the config's test loader, cycling a short set."""
    folder = str(tmp_path / "digits")
    generate_digits_dataset(folder, num_train=1, num_val=3, image_size=64, log_every=0)
    register_digits(folder, names=("bench_digits_train", "bench_digits_val"))
    spec = importlib.util.spec_from_file_location("dino_d2_tools_benchmark", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    argv = ["--config-file", tiny_config, "--dataset", "--batch-size", "2", "--num-iter", "2"]
    argv += ["--warmup", "0", "--json", "train.device=cpu", "model.num_classes=10"]
    argv += ["dataloader.test.dataset.names=bench_digits_val"]
    assert tool.main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["input"] == "dataset bench_digits_val" and results["batch_size"] == 2

    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(tiny_config), ["dataloader.test.dataset.names=bench_digits_val"]
    )
    batches = tool.dataset_batches(cfg, num_batches=3, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 2]
    ids = [x["image_id"] for b in batches for x in b]
    assert ids[3:] == ids[:3] and len(set(ids)) == 3
    assert all(x["image"].shape[-2:] == (64, 64) for b in batches for x in b)
