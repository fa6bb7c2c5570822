"""Benchmark the multi-scale deformable attention backends at DINO's encoder shape.

The shape is that of the 4-scale DINO encoder on an 800x1333 image: levels (100, 167), (50, 84),
(25, 42), (13, 21), so Q = S = 22,223 queries, 8 heads of 32 channels, 4 points, batch 1, float32.

Every backend is measured in a fresh process (so that its peak memory is its own): median
``forward_ms`` and ``forward_backward_ms`` (gradients w.r.t. value, sampling locations and
attention weights) over ``--runs`` timed runs after ``--warmup`` untimed ones, ``peak_rss_mb``
(peak resident memory of one forward + backward pass, above the resident memory with the inputs
allocated; Linux only, null elsewhere) and ``max_abs_diff_vs_pytorch`` (forward output against
the pure-PyTorch reference on the same inputs).

Usage::

    python tools/benchmark_msda.py [--runs 5] [--warmup 1] [--backends pytorch cpu] [--json]
    # on a GPU: the CUDA kernel against the PyTorch reference running on the GPU too
    python tools/benchmark_msda.py --backends pytorch cuda --reference-device cuda
"""

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time

import torch

from dino_d2.layers import ms_deform_attn as msda

__all__ = ["SPATIAL_SHAPES", "measure_backend", "main"]

SPATIAL_SHAPES = ((100, 167), (50, 84), (25, 42), (13, 21))
NUM_HEADS = 8
HEAD_DIM = 32
NUM_POINTS = 4
SEED = 0


def _log(message):
    print(f"[benchmark_msda] {message}", file=sys.stderr, flush=True)


def _make_inputs(device):
    """Deterministic inputs, identical in every process; created on the CPU, then moved."""
    gen = torch.Generator().manual_seed(SEED)
    shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    q, m, d, l, p = s, NUM_HEADS, HEAD_DIM, len(SPATIAL_SHAPES), NUM_POINTS
    value = torch.rand(1, s, m, d, generator=gen)
    locations = torch.rand(1, q, m, l, p, 2, generator=gen)
    weights = torch.rand(1, q, m, l * p, generator=gen).softmax(-1).view(1, q, m, l, p)
    grad = torch.rand(1, q, m * d, generator=gen)
    tensors = [value, shapes, starts, locations, weights, grad]
    return [t.to(device) for t in tensors]


def _current_rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak_rss():
    """Resets the kernel's peak-RSS counter of this process; returns False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_backend(backend, runs, warmup, reference_device="cpu"):
    """Measures one backend in the current process.

    Args:
        backend: "pytorch", "cpu" or "cuda".
        runs: number of timed runs (the median is reported).
        warmup: number of untimed runs before them.
        reference_device: the device the "pytorch" backend runs on ("cpu" or "cuda").

    Returns:
        dict with forward_ms, forward_backward_ms, peak_rss_mb and max_abs_diff_vs_pytorch
        (plus peak_cuda_mb for the cuda backend).
    """
    if backend not in ("pytorch", "cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend != "pytorch":
        os.environ.pop(msda.BACKEND_ENV_VAR, None)
        if "compiled" not in msda.available_backends(backend):
            raise RuntimeError(f"backend {backend!r} is not available here")
    if reference_device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--reference-device cuda, but no CUDA GPU is visible")
    device = torch.device(reference_device if backend == "pytorch" else backend)
    value, shapes, starts, locations, weights, grad = _make_inputs(device)
    leaves = [value, locations, weights]

    def fn(value, shapes, locations, weights):
        if backend == "pytorch":
            return msda.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
        return msda.multi_scale_deformable_attn(value, shapes, starts, locations, weights)

    def forward():
        with torch.no_grad():
            out = fn(value, shapes, locations, weights)
        _sync(device)
        return out

    def forward_backward():
        inputs = [t.detach().requires_grad_() for t in leaves]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(grad)
        _sync(device)

    # Memory first, on one forward + backward pass in this fresh process: repeated runs would
    # also measure how the allocator's free lists grow, not what the op needs.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    peak_rss_mb = None
    if _reset_peak_rss():
        base_kb = _current_rss_kb()
        forward_backward()
        peak_rss_mb = max(0, _peak_rss_kb() - base_kb) / 1024
    else:
        _log("/proc/self/clear_refs is unavailable: peak_rss_mb is not measured")
        forward_backward()
    result = {"peak_rss_mb": peak_rss_mb}
    if device.type == "cuda":
        result["peak_cuda_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20

    for name, step in (("forward", forward), ("forward_backward", forward_backward)):
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times.append(elapsed)
            kind = "warm-up" if i < warmup else f"run {i - warmup + 1}/{runs}"
            _log(f"{backend}: {name} {kind}: {elapsed:.1f} ms")
        result[f"{name}_ms"] = statistics.median(times)

    output = forward()
    if backend == "pytorch":
        result["max_abs_diff_vs_pytorch"] = 0.0
    else:
        with torch.no_grad():
            reference = msda.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
        result["max_abs_diff_vs_pytorch"] = (output - reference).abs().max().item()
    result["threads"] = torch.get_num_threads()
    order = ["forward_ms", "forward_backward_ms", "peak_rss_mb", "peak_cuda_mb"]
    order += ["max_abs_diff_vs_pytorch", "threads"]
    return {key: result[key] for key in order if key in result}


def _child(backend, runs, warmup, reference_device, queue):
    try:
        queue.put(("ok", measure_backend(backend, runs, warmup, reference_device)))
    except Exception as e:  # reported by the parent, which owns the exit status
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _measure_in_subprocess(backend, runs, warmup, reference_device):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(backend, runs, warmup, reference_device, queue))
    process.start()
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"the process measuring {backend!r} died with exit code {process.exitcode}"
                ) from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"measuring backend {backend!r} failed: {payload}")
    return payload


def _format_mb(value):
    return "n/a" if value is None else f"{value:.1f}"


def _print_table(results, args):
    q = sum(h * w for h, w in SPATIAL_SHAPES)
    threads = next(iter(results.values()))["threads"]
    print(
        f"Multi-scale deformable attention, N=1, Q=S={q:,}, M={NUM_HEADS}, D={HEAD_DIM}, "
        f"L={len(SPATIAL_SHAPES)}, P={NUM_POINTS}, float32, {threads} CPU threads, "
        f"median of {args.runs} runs after {args.warmup} warm-up, "
        f"PyTorch reference on {args.reference_device}"
    )
    header = (
        f"{'backend':<9}{'forward_ms':>12}{'fwd+bwd_ms':>12}{'peak_rss_mb':>13}{'max_abs_diff':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<9}{r['forward_ms']:>12.1f}{r['forward_backward_ms']:>12.1f}"
            f"{_format_mb(r['peak_rss_mb']):>13}{r['max_abs_diff_vs_pytorch']:>14.2e}"
        )
    if "pytorch" in results:
        ref = results["pytorch"]
        for name, r in results.items():
            if name == "pytorch":
                continue
            print(
                f"speedup {name} vs pytorch: forward {ref['forward_ms'] / r['forward_ms']:.1f}x, "
                f"forward+backward {ref['forward_backward_ms'] / r['forward_backward_ms']:.1f}x"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["pytorch", "cpu", "cuda"],
        help="backends to measure (default: every available one)",
    )
    parser.add_argument(
        "--reference-device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the PyTorch reference (the 'pytorch' backend)",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON line")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    compiled = [d for d in ("cpu", "cuda") if "compiled" in msda.available_backends(d)]
    backends = args.backends or ["pytorch"] + compiled
    results = {}
    for backend in backends:
        _log(f"measuring {backend} in a fresh process")
        results[backend] = _measure_in_subprocess(
            backend, args.runs, args.warmup, args.reference_device
        )

    if args.json:
        report = {
            "backends": results,
            "reference_device": args.reference_device,
            "cuda_kernel_compiled": msda.cuda_kernel_compiled(),
        }
        print(json.dumps(report))
    else:
        _print_table(results, args)
