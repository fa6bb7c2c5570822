"""tools/gpu_check.py: its CPU smoke run takes every path of the GPU check; without a GPU the
GPU check itself stops with a clear error."""

import json
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import LazyConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")
# Off the GPU: every stage but the float16 ones.
STAGES = {"tests", "msda", "inference_fp32", "inference_bf16", "training_fp32", "training_bf16"}


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_the_check_says_so():
    result = _run()
    assert result.returncode == 2
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and "no CUDA GPU is visible" in summary["error"]
    assert "--device cpu --smoke" in summary["error"]
    result = _run("--print-cuda-arch")
    assert result.returncode == 2 and result.stdout == ""
    assert "no CUDA GPU is visible" in result.stderr


def test_cpu_smoke_run_prints_one_json_summary(tmp_path, tiny_dino_config):
    config = str(tmp_path / "tiny.yaml")
    LazyConfig.save(tiny_dino_config(), config)
    result = _run("--device", "cpu", "--smoke", "--smoke-size", "64", "64", "--config-file", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert summary["ok"] is True and set(summary["stages"]) == STAGES
    assert summary["environment"]["device"] == "cpu"
    stages = summary["stages"]
    assert all(stage["ok"] and stage["seconds"] > 0 for stage in stages.values())
    # Off the GPU the CUDA tests are collected and skip; none fails.
    tests = stages["tests"]
    assert tests["skipped"] >= 1 and tests["failures"] == tests["errors"] == 0
    assert "needs a CUDA GPU" in tests["skip_reasons"]
    assert set(stages["msda"]["backends"]) == {"cpu"}
    assert stages["inference_fp32"]["amp"] is None
    assert stages["inference_bf16"]["amp"] == "bfloat16"
    assert stages["inference_fp32"]["input"] == "random 64x64"
    assert stages["inference_fp32"]["fast_path_parity_passed"] is True
    assert stages["inference_bf16"]["latency_to_limit"] > 0
    for name, precision in (("training_fp32", "float32"), ("training_bf16", "bfloat16")):
        training = stages[name]
        assert training["train_precision"] == precision and training["batch_size"] == 2
        assert training["images_per_s"] > 0
