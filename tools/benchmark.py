#!/usr/bin/env python
"""Inference latency and memory of a dino_d2 config.

    python tools/benchmark.py --config-file configs/dino_r50_4scale_12ep.py
    python tools/benchmark.py --config-file configs/dino_r18_digits.py --dataset --num-iter 20 \\
        --batch-size 2 --json train.device=cpu

The model is built from the config with its initial weights (the weights do not change the
work done: DINO always keeps the same number of queries), put in eval mode and run without
gradients on the config's device (``train.device``; CUDA when available). Inputs are random
images of ``--height`` x ``--width`` (the same batch every iteration) or, with ``--dataset``, the
first images of the config's test data loader, read and resized before timing starts.
``--warmup`` iterations are run first and not timed.

Reported: median and mean latency per image (a batch's time divided by its size), images per
second, the process's peak resident memory (``ru_maxrss``: building the model and reading the
images count too) and, on CUDA, ``torch.cuda.max_memory_allocated`` during the timed
iterations. ``--json`` prints them as one JSON line on stdout (the progress goes to stderr).
"""

import argparse
import itertools
import json
import logging
import resource
import statistics
import sys
import time
from typing import Dict, List

import psutil
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate

import dino_d2.modeling  # noqa: F401  (registers DINO and the backbones)
from dino_d2.data import register_builtin_datasets
from dino_d2.engine import resolve_device

__all__ = ["random_batches", "dataset_batches", "benchmark", "peak_rss_mb", "main"]

logger = logging.getLogger("dino_d2.benchmark")


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def random_batches(num_batches: int, batch_size: int, height: int, width: int) -> List[List[Dict]]:
    """``num_batches`` references to one batch of random 0-255 float images (3, height, width)."""
    generator = torch.Generator().manual_seed(0)
    batch = [
        {"image": torch.rand(3, height, width, generator=generator) * 255}
        for _ in range(batch_size)
    ]
    return [batch] * num_batches


def dataset_batches(cfg, num_batches: int, batch_size: int) -> List[List[Dict]]:
    """Batches of the first images of ``cfg.dataloader.test`` (read and resized by its mapper).

    A dataset with fewer images than needed is cycled through.
    """
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
    register_builtin_datasets([names] if isinstance(names, str) else list(names))
    needed = num_batches * batch_size
    inputs = []
    for batch in instantiate(cfg.dataloader.test):
        inputs.extend(batch)
        if len(inputs) >= needed:
            break
    if not inputs:
        raise ValueError(f"the test data loader of the config ({names}) yields no images")
    if len(inputs) < needed:
        logger.info(f"The test set has {len(inputs)} images; cycling through them")
    inputs = list(itertools.islice(itertools.cycle(inputs), needed))
    return [inputs[i : i + batch_size] for i in range(0, needed, batch_size)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(model, batches: List[List[Dict]], warmup: int) -> Dict:
    """Runs ``model`` on every batch; times all but the first ``warmup``.

    Args:
        model: a Detectron2 model in eval mode.
        batches: lists of model inputs (dicts with ``image``).
        warmup: number of leading batches not timed.

    Returns:
        latency statistics in milliseconds per image and, on CUDA, peak allocated memory.
    """
    device = next(model.parameters()).device
    per_image_ms = []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            start = time.perf_counter()
            model(batch)
            _synchronize(device)
            elapsed = time.perf_counter() - start
            timed = index >= warmup
            if timed:
                per_image_ms.append(1000 * elapsed / len(batch))
            if timed:
                step = f"iteration {index - warmup + 1}/{len(batches) - warmup}"
            else:
                step = f"warm-up {index + 1}/{warmup}"
            logger.info(f"{step}: {1000 * elapsed / len(batch):.1f} ms/image")
    result = {
        "latency_ms_median": statistics.median(per_image_ms),
        "latency_ms_mean": statistics.fmean(per_image_ms),
        "latency_ms_min": min(per_image_ms),
        "images_per_s": 1000 / statistics.fmean(per_image_ms),
        "cuda_max_memory_allocated_mb": None,
    }
    if device.type == "cuda":
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 1024**2
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument("--num-iter", type=int, default=50, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="iterations run before timing")
    parser.add_argument("--batch-size", type=int, default=1, help="images per iteration")
    parser.add_argument("--height", type=int, default=800, help="random input height")
    parser.add_argument("--width", type=int, default=1333, help="random input width")
    parser.add_argument(
        "--dataset", action="store_true", help="use the config's test loader, not random images"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    for name in ("num_iter", "batch_size", "height", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s"
    )

    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    device = resolve_device(OmegaConf.select(cfg, "train.device", default=None))
    model = instantiate(cfg.model).to(device).eval()
    num_batches = args.warmup + args.num_iter
    if args.dataset:
        batches = dataset_batches(cfg, num_batches, args.batch_size)
        source = f"dataset {OmegaConf.select(cfg, 'dataloader.test.dataset.names')}"
    else:
        batches = random_batches(num_batches, args.batch_size, args.height, args.width)
        source = f"random {args.height}x{args.width}"
    logger.info(f"Device: {device}; inputs: {source}; batch size {args.batch_size}")

    results = {
        "config": args.config_file,
        "device": str(device),
        "input": source,
        "batch_size": args.batch_size,
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        **benchmark(model, batches, args.warmup),
        "peak_rss_mb": peak_rss_mb(),
        "rss_mb": psutil.Process().memory_info().rss / 1024**2,
    }
    if args.json:
        print(json.dumps(results))
    else:
        print(
            f"{source}, batch {args.batch_size}, {args.num_iter} iterations on {device}:\n"
            f"  latency per image: median {results['latency_ms_median']:.1f} ms, "
            f"mean {results['latency_ms_mean']:.1f} ms ({results['images_per_s']:.2f} images/s)\n"
            f"  peak RSS: {results['peak_rss_mb']:.0f} MiB"
        )
        if results["cuda_max_memory_allocated_mb"] is not None:
            print(f"  CUDA max allocated: {results['cuda_max_memory_allocated_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
