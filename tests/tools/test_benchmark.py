"""tools/benchmark.py with a tiny DINO on the CPU: inference, training steps, a busy machine."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import LazyConfig, instantiate

from dino_d2.data import generate_digits_dataset, register_digits
from dino_d2.engine import bfloat16_is_native
from dino_d2.measure import dataset_batches, time_inference
from dino_d2.export.exporter import export_model, min_input_size
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.verify import verification_batches

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "benchmark.py")

KEYS = {
    "config", "mode", "device", "input", "batch_size", "num_iter", "warmup", "amp", "torch_threads",
    "latency_ms_median", "latency_ms_mean", "latency_ms_min", "images_per_s",
    "cuda_max_memory_allocated_mb", "peak_rss_mb", "rss_mb", "kept_freed_memory",
}  # fmt: skip
LIMIT_KEYS = {"gmacs", "precision", "gemm_library", "gemm_gmacs_per_s", "limit_s"}
LIMIT_KEYS |= {"latency_to_limit", "limits"}
PARITY_KEYS = {"fast_path_parity", "fast_path_parity_passed", "fast_path_max_score_diff"}


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
    assert set(results) == KEYS | LIMIT_KEYS | PARITY_KEYS | {"inference_process"}
    # The limit: fvcore's count of the model at this size, at the fastest float32 GEMM measured;
    # the bfloat16 limit beside it.
    assert 0 < results["gmacs"] < 5 and results["gemm_gmacs_per_s"] > 0.1
    assert results["limit_s"] == pytest.approx(results["gmacs"] / results["gemm_gmacs_per_s"])
    assert results["precision"] == "float32" and set(results["limits"]) == {"float32", "bfloat16"}
    float32 = results["limits"]["float32"]
    assert float32["gmacs_per_s"] == max(float32["rates"].values()) == results["gemm_gmacs_per_s"]
    assert results["latency_to_limit"] == pytest.approx(
        results["latency_ms_median"] / 1000 / results["limit_s"]
    )
    assert results["fast_path_parity_passed"] and results["fast_path_max_score_diff"] <= 1e-4
    assert results["device"] == "cpu" and results["input"] == "random 64x96"
    assert results["num_iter"] == 2 and results["batch_size"] == 1
    assert results["cuda_max_memory_allocated_mb"] is None
    assert 0 < results["latency_ms_min"] <= results["latency_ms_median"]
    assert results["rss_mb"] > 0
    # The fresh inference process: its imports, then its build, then its run, each counted.
    process = results["inference_process"]
    assert 0 < process["imports_rss_mb"] <= process["built_rss_mb"] <= process["peak_rss_mb"]
    # This process imported at least as much and built the model twice (plain and fast path)
    # before its timing peak; what it imports later (the parity's scipy) is not in that figure.
    assert results["peak_rss_mb"] >= process["built_rss_mb"] * 0.99
    assert (process["height"], process["width"], process["amp"]) == (64, 96, None)
    assert "iteration 2/2" in result.stderr and "warm-up 1/1" in result.stderr


def test_test_set_inputs_in_batches(tiny_config, tmp_path):
    """dataset_batches reads the first images of the config's test loader, cycling a short set."""
    folder = str(tmp_path / "digits")
    generate_digits_dataset(folder, num_train=1, num_val=3, image_size=64, log_every=0)
    register_digits(folder, names=("bench_digits_train", "bench_digits_val"))
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(tiny_config),
        ["dataloader.test.dataset.names=bench_digits_val", "model.num_classes=10"],
    )
    batches = dataset_batches(cfg, num_batches=3, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 2]
    ids = [x["image_id"] for b in batches for x in b]
    assert ids[3:] == ids[:3] and len(set(ids)) == 3
    assert all(x["image"].shape[-2:] == (64, 64) for b in batches for x in b)

    model = instantiate(cfg.model).eval()
    results = time_inference(model, batches, warmup=1)
    assert 0 < results["latency_ms_min"] <= results["latency_ms_median"]
    assert results["images_per_s"] > 0 and results["cuda_max_memory_allocated_mb"] is None


def test_exported_model_timed_and_compared_with_eager(tiny_dino_config, tmp_path):
    """--pt2 times an export beside the eager model and pairs its detections with eager's; with
    other weights than the export's the comparison fails and so does the exit code."""
    cfg = tiny_dino_config()
    config = str(tmp_path / "tiny.yaml")
    LazyConfig.save(cfg, config)
    torch.manual_seed(5)
    model = instantiate(cfg.model).eval()
    weights = str(tmp_path / "weights.pth")
    torch.save({"model": model.state_dict()}, weights)
    graph = InferenceGraph(model)
    export = export_model(
        graph,
        verification_batches(
            lambda h, w: torch.randint(256, (3, h, w), dtype=torch.uint8), [[(96, 128), (80, 112)]]
        )[0],
        "pt2",
        str(tmp_path / "export"),
        preprocessing={"input_dtype": "uint8", "min_input_size": min_input_size(graph)},
        verification=[],
    )
    common = [
        "--config-file", config, "--height", "96", "--width", "128", "--num-iter", "2",
        "--warmup", "1", "--no-limit", "--no-parity", "--no-process-memory", "--pt2", export.path,
        "--json",
        "--baseline-s", "10", "--baseline-sgemm", "1", "--unsafe-load",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    alternate = ["--alternate", "2", "--weights", weights]
    result = _run_tool(*common, *alternate, "train.device=cpu", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    pt2 = results["exported"]["pt2"]
    assert pt2["parity_passed"] and pt2["max_score_diff"] <= 1e-4, pt2["parity"]
    assert 0 < pt2["latency_ms_min"] <= pt2["latency_ms_median"]
    # --alternate: eager, then the export, each alone in a fresh process, twice; a ratio a round.
    alternated = results["alternated"]
    assert alternated["rounds"] == 2 and alternated["reference"] == "eager"
    assert set(alternated["runtimes"]) == {"pt2"}
    eager, pt2 = alternated["reference_latency_ms_median"], alternated["runtimes"]["pt2"]
    assert len(eager) == len(pt2["latency_ms_median"]) == 2 and min(eager) > 0
    ratios = [ms / e for ms, e in zip(pt2["latency_ms_median"], eager)]
    assert pt2["ratio_per_round"] == pytest.approx(ratios)
    assert pt2["ratio_median"] == pytest.approx(sum(ratios) / 2)
    log = result.stderr
    order = [
        log.index(f"Alternation {r}/2: {name} alone") for r in (1, 2) for name in ("eager", "pt2")
    ]
    assert order == sorted(order)
    assert results["speedup"] == pytest.approx(10 / (results["latency_ms_median"] / 1000))
    scaled = results["speedup"] / results["gemm_gmacs_per_s_float32"]
    assert results["speedup_scaled"] == pytest.approx(scaled)

    # The config's own (other) random weights: the detections differ, and the run fails.
    result = _run_tool(*common, "train.device=cpu", env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert not json.loads(result.stdout.strip().splitlines()[-1])["exported"]["pt2"][
        "parity_passed"
    ]


TRAIN_KEYS = KEYS - {"latency_ms_median", "latency_ms_mean", "latency_ms_min", "images_per_s"}
TRAIN_KEYS |= {"step_s_median", "step_s_mean", "step_s_min", "threads", "total_loss"}
TRAIN_KEYS |= {"train_precision"}
BUSY_KEYS = (TRAIN_KEYS - {"step_s_mean"}) | {
    "busy_step_s_median", "busy_step_s_min", "busy_threads", "busy_ratio",
    "busy_ratio_per_round", "busy_processes", "settle_steps", "others_cpus_idle",
    "others_cpus_busy",
}  # fmt: skip


def _run_tool(*args, env=None):
    command = [sys.executable, TOOL, *args]
    env = dict(os.environ, **(env or {}))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result


def test_training_steps(tiny_config):
    result = _run_tool(
        "--config-file", tiny_config, "--train", "--batch-size", "2", "--height", "64",
        "--width", "80", "--num-boxes", "3", "--num-iter", "2", "--warmup", "1", "--json",
        "train.device=cpu", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(results) == TRAIN_KEYS
    assert results["mode"] == "train" and results["input"] == "random 64x80, 3 boxes/image"
    assert results["batch_size"] == 2 and results["threads"] == [1, 1]
    # train.amp.precision="auto" (every config's default): bf16 where the CPU computes it.
    native = bfloat16_is_native("cpu")
    assert results["train_precision"] == ("bfloat16" if native else "float32")
    assert 0 < results["step_s_min"] <= results["step_s_median"]
    assert math.isfinite(results["total_loss"]) and results["total_loss"] > 0
    assert "iteration 2/2" in result.stderr and "warm-up 1/1" in result.stderr


def test_training_steps_idle_and_busy(tiny_config):
    result = _run_tool(
        "--config-file", tiny_config, "--train", "--height", "64", "--width", "64",
        "--num-iter", "2", "--warmup", "0", "--busy", "1", "--busy-block", "1",
        "--busy-settle", "0", "--json",
        "train.device=cpu", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(results) == BUSY_KEYS
    assert results["busy_processes"] == 1 and len(results["busy_ratio_per_round"]) == 2
    assert results["settle_steps"] == 0
    loads = results["others_cpus_idle"] + results["others_cpus_busy"]
    assert len(loads) == 4 and all(load is None or load >= 0 for load in loads)
    assert len(results["threads"]) == len(results["busy_threads"]) == 2
    ratio = results["busy_step_s_median"] / results["step_s_median"]
    assert results["busy_ratio"] == pytest.approx(ratio)
    assert "round 2/2: 1 busy process(es)" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--busy", "1"], "add --train"),
        (["--train", "--num-boxes", "0"], "--num-boxes"),
        (["--pt2", "model.pt2"], "can run code"),
        (["--alternate", "2"], "--alternate times the eager model against exports"),
        (["--alternate", "-1"], "--alternate must not be negative"),
    ],
)
def test_bad_arguments(args, message):
    result = _run_tool("--config-file", "unused.py", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
