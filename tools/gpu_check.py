#!/usr/bin/env python
"""Checks dino_d2 on a machine with one CUDA GPU and prints one JSON summary.

    python tools/gpu_check.py                 # `make gpu-check` runs this after the set-up
    python tools/gpu_check.py --device cpu --smoke   # the same paths on the CPU, small sizes
    python tools/gpu_check.py --print-cuda-arch      # the GPU's architecture, e.g. 9.0

Each stage runs in its own process, so that a failing stage (a kernel error, running out of
memory) is reported and the next one still runs:

* ``tests``: the CUDA tests of ``tests/layers`` (the deformable attention kernels against the
  float64 reference in float32, float64, half and bfloat16, and gradcheck); on a GPU, a test
  skipped for want of CUDA is a failure;
* ``msda``: ``tools/benchmark_msda.py``, the CUDA kernel against the PyTorch reference, both on
  the GPU, at the DINO-4scale 800x1333 encoder shape;
* ``inference_fp32``, ``inference_bf16`` and ``inference_fp16``: ``tools/benchmark.py`` on
  DINO-R50 4-scale at 800x1333, batch 1, in float32 and under bfloat16 and float16 autocast
  (latency against the matrix-math limit of its precision, images/s, peak memory, the fast
  path's parity);
* ``training_fp32``, ``training_bf16`` and ``training_fp16``: ``tools/benchmark.py --train``:
  training steps at batch 2 in float32 and in mixed precision (bfloat16; float16 with a
  GradScaler).

Off the GPU (``--device cpu``) the float16 stages are left out: float16 autocast is a CUDA
precision (``dino_d2.engine.precision``).

The summary (on stdout; progress goes to stderr) has ``ok``, the environment, every stage's
figures, ``ok``, ``seconds`` and, when it failed, ``error`` (the end of its output), and the
total ``seconds``. The stages share a time budget (``--budget-s``, 540 s by default, so that the
check ends within 10 minutes); a stage that no longer fits is reported as not run. The exit
status is 0 when every stage passed, 1 otherwise, 2 when there is no GPU to check.
"""

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50_CONFIG = os.path.join(REPO, "configs", "dino_r50_4scale_12ep.py")

__all__ = ["main"]

# Timed iterations and warm-up of each measurement: on the GPU, and in the CPU smoke run.
_ITERATIONS = {"cuda": {"inference": (20, 5), "train": (10, 3)}}
_SMOKE_ITERATIONS = {"inference": (1, 1), "train": (1, 1)}
# The longest each stage may take (seconds), within the total budget.
_STAGE_TIMEOUTS = {
    "tests": 180,
    "msda": 90,
    "inference_fp32": 90,
    "inference_bf16": 90,
    "inference_fp16": 90,
    "training_fp32": 120,
    "training_bf16": 120,
    "training_fp16": 120,
}
# The autocast dtype of each stage's suffix (None: float32).
_PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
_OUTPUT_TAIL = 2000


def _log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def cuda_arch() -> str:
    """The compute capability of GPU 0 as ``TORCH_CUDA_ARCH_LIST`` spells it, e.g. ``"9.0"``."""
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def environment(device: str) -> Dict:
    """Versions, the GPU and what the compiled extension provides."""
    from dino_d2.layers.ms_deform_attn import available_backends, cuda_kernel_compiled

    info = {
        "device": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "msda_backends": available_backends(device),
        "cuda_kernel_compiled": cuda_kernel_compiled(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_arch=cuda_arch(),
            gpu_memory_gb=round(props.total_memory / 1024**3, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def _run(command: List[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _tail(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-_OUTPUT_TAIL:]


def _json_line(result: subprocess.CompletedProcess, failed_ok: bool = False) -> Dict:
    """The JSON summary on the last line of ``result``'s output. A failed run raises, unless
    ``failed_ok`` and it printed one (tools/benchmark.py exits 1 after printing a failed
    parity)."""
    lines = result.stdout.strip().splitlines()
    if lines and (result.returncode == 0 or failed_ok):
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    raise RuntimeError(f"exit code {result.returncode}:\n{_tail(result)}")


def stage_tests(device: str, timeout: float) -> Dict:
    """The CUDA tests of tests/layers, counted from pytest's JUnit XML report."""
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "junit.xml")
        command = [sys.executable, "-m", "pytest", os.path.join(REPO, "tests", "layers")]
        command += ["-q", "-k", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}"]
        result = _run(command, timeout)
        if not os.path.exists(report):
            raise RuntimeError(f"pytest wrote no report, exit code {result.returncode}")
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        reasons = [skip.get("message", "") for skip in suite.iter("skipped")]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = counts["failures"] + counts["errors"]
    # Off the GPU the CUDA tests skip, as they must; on it, none may skip for want of a GPU.
    gpu_skips = [r for r in reasons if "cuda" in r.lower() or "gpu" in r.lower()]
    ok = failed == 0 and counts["tests"] > 0 and (device != "cuda" or not gpu_skips)
    out = {"ok": ok, **counts, "skip_reasons": sorted(set(reasons))}
    if not ok:
        out["error"] = _tail(result)
    return out


def stage_msda(device: str, smoke: bool, timeout: float) -> Dict:
    """tools/benchmark_msda.py: the compiled kernel against the reference on the same device."""
    command = [sys.executable, os.path.join(REPO, "tools", "benchmark_msda.py"), "--json"]
    if device == "cuda":
        command += ["--backends", "pytorch", "cuda", "--reference-device", "cuda"]
    else:
        # The CPU reference takes seconds at this shape: the smoke run times the kernel only.
        command += ["--backends", "cpu"]
    if smoke:
        command += ["--runs", "1", "--warmup", "0"]
    report = _json_line(_run(command, timeout))
    out = {"ok": True, **report}
    backends = report["backends"]
    if "pytorch" in backends and device in backends:
        reference, kernel = backends["pytorch"], backends[device]
        out["speedup_forward"] = reference["forward_ms"] / kernel["forward_ms"]
        out["speedup_forward_backward"] = (
            reference["forward_backward_ms"] / kernel["forward_backward_ms"]
        )
    out["ok"] = all(b["max_abs_diff_vs_pytorch"] < 1e-3 for b in backends.values())
    return out


def _benchmark_command(args, *extra: str) -> List[str]:
    command = [sys.executable, os.path.join(REPO, "tools", "benchmark.py")]
    return command + ["--config-file", args.config_file, "--json", *extra]


def _iterations(args, kind: str) -> List[str]:
    num_iter, warmup = (_SMOKE_ITERATIONS if args.smoke else _ITERATIONS["cuda"])[kind]
    return ["--num-iter", str(num_iter), "--warmup", str(warmup)]


def _size(args, height: int, width: int) -> List[str]:
    if args.smoke:
        height, width = args.smoke_size
    return ["--height", str(height), "--width", str(width)]


def stage_inference(args, amp: Optional[str], timeout: float) -> Dict:
    """tools/benchmark.py inference at 800x1333, batch 1, optionally under autocast."""
    command = _benchmark_command(args, *_iterations(args, "inference"), *_size(args, 800, 1333))
    command += ["--amp", amp] if amp else []
    if args.device == "cuda":
        # The host memory of a fresh process is a CPU figure; the GPU's is reported below.
        command += ["--no-process-memory"]
    command += [f"train.device={args.device}"]
    result = _json_line(_run(command, timeout), failed_ok=True)
    keys = ("input", "amp", "latency_ms_median", "images_per_s", "cuda_max_memory_allocated_mb")
    keys += ("peak_rss_mb", "latency_to_limit", "limit_s", "gemm_gmacs_per_s", "gmacs")
    keys += ("fast_path_parity_passed", "fast_path_max_score_diff", "fast_path_parity")
    out = {k: result.get(k) for k in keys}
    return {"ok": result.get("fast_path_parity_passed", True), **out}


def stage_training(args, amp: Optional[str], timeout: float) -> Dict:
    """tools/benchmark.py --train: steps at batch 2 in float32 (``amp`` None, train.amp off) or
    in mixed precision."""
    command = _benchmark_command(
        args, "--train", "--batch-size", "2", *_iterations(args, "train"),
        *_size(args, 800, 1333), *(["--amp", amp] if amp else []),
        # The config overrides take the rest of the command line.
        f"train.device={args.device}", *([] if amp else ["train.amp.enabled=False"]),
    )  # fmt: skip
    result = _json_line(_run(command, timeout))
    keys = ("input", "amp", "train_precision", "batch_size", "step_s_median", "step_s_min")
    keys += ("total_loss", "cuda_max_memory_allocated_mb", "peak_rss_mb")
    out = {"ok": math.isfinite(result["total_loss"]), **{k: result[k] for k in keys}}
    out["images_per_s"] = result["batch_size"] / result["step_s_median"]
    return out


def default_stages(device: str) -> List[str]:
    """Every stage, less the float16 ones off the GPU."""
    return [name for name in _STAGE_TIMEOUTS if device == "cuda" or not name.endswith("_fp16")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--smoke", action="store_true", help="one iteration of each measurement at --smoke-size"
    )
    parser.add_argument(
        "--smoke-size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"),
        help="image size of the --smoke measurements",
    )  # fmt: skip
    parser.add_argument("--config-file", default=R50_CONFIG, help="the model to measure")
    parser.add_argument(
        "--stages", nargs="+", choices=list(_STAGE_TIMEOUTS),
        help="the stages to run (default: all; off the GPU, all but float16)",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=540.0, help="time for all stages")
    parser.add_argument(
        "--print-cuda-arch", action="store_true", help="print the GPU's architecture and exit"
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    no_gpu = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if args.print_cuda_arch:
        if not torch.cuda.is_available():
            print(f"gpu_check: {no_gpu}", file=sys.stderr)
            return 2
        print(cuda_arch())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        hint = "; `tools/gpu_check.py --device cpu --smoke` runs the same paths on the CPU"
        print(json.dumps({"ok": False, "error": no_gpu + hint}))
        return 2

    start = time.monotonic()
    summary = {"ok": False, "environment": environment(args.device), "stages": {}}
    stages = {
        "tests": lambda timeout: stage_tests(args.device, timeout),
        "msda": lambda timeout: stage_msda(args.device, args.smoke, timeout),
    }
    for suffix, amp in _PRECISIONS.items():
        stages[f"inference_{suffix}"] = functools.partial(stage_inference, args, amp)
        stages[f"training_{suffix}"] = functools.partial(stage_training, args, amp)
    for name in args.stages or default_stages(args.device):
        left = args.budget_s - (time.monotonic() - start)
        timeout = min(_STAGE_TIMEOUTS[name], left)
        if timeout < 10:
            summary["stages"][name] = {"ok": False, "error": "not run: the time budget is spent"}
            continue
        _log(f"{name} (at most {timeout:.0f} s)")
        stage_start = time.monotonic()
        try:
            result = stages[name](timeout)
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[-_OUTPUT_TAIL:]}
        result["seconds"] = round(time.monotonic() - stage_start, 1)
        _log(f"{name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s")
        summary["stages"][name] = result
    summary["ok"] = all(stage["ok"] for stage in summary["stages"].values())
    summary["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
