#!/usr/bin/env python
"""Inference latency, or training-step time, and memory of a dino_d2 config.

    # inference: random 800x1333 images, batch 1
    python tools/benchmark.py --config-file configs/dino_r50_4scale_12ep.py
    python tools/benchmark.py --config-file configs/dino_r18_digits.py --dataset --num-iter 20 \\
        --batch-size 2 --json train.device=cpu
    # training steps (forward, backward, gradient clipping, optimizer step; no data loader)
    python tools/benchmark.py --config-file configs/dino_r50_4scale_12ep.py --train \\
        --batch-size 2 --height 640 --width 640 --num-boxes 5
    python tools/benchmark.py --config-file configs/dino_r18_digits.py --train \\
        --batch-size 8 --height 192 --width 192
    # the same, idle and with one other process keeping a core busy, in alternating blocks
    python tools/benchmark.py --config-file configs/dino_r18_digits.py --train \\
        --batch-size 8 --height 192 --width 192 --busy 1

The model is built from the config with its initial weights (the weights do not change the
work done: DINO always keeps the same number of queries) on the config's device
(``train.device``; CUDA when available). Inference runs it in eval mode without gradients on
random images of ``--height`` x ``--width`` (the same batch every iteration) or, with
``--dataset``, on the first images of the config's test data loader, read before timing starts.
``--train`` times the step of ``tools/lazyconfig_train_net.py`` (the config's optimizer,
gradient clipping, mixed precision and EMA) on one batch of random images with ``--num-boxes``
random ground-truth boxes each. ``--warmup`` iterations are run first and not timed.

``--busy N`` starts N spinning processes (another user's jobs) during every other block of
steps (``--busy-settle`` seconds of untimed steps, then ``--busy-block`` timed ones; ``--num-iter``
rounds of an idle and a busy block) and reports the busy / idle ratio of the median step times.

Reported: median, mean and minimum time per image (inference) or per step (training), the
process's peak resident memory (``ru_maxrss``: building the model counts too), the number of
compute threads and, on CUDA, ``torch.cuda.max_memory_allocated`` during the timed iterations.
``--json`` prints them as one JSON line on stdout (the progress goes to stderr).
"""

import argparse
import json
import logging
import sys

import psutil
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate

import dino_d2.modeling  # noqa: F401  (registers DINO and the backbones)
from dino_d2.engine import resolve_device
from dino_d2.engine.benchmark import (
    build_training,
    dataset_batches,
    peak_rss_mb,
    random_batches,
    time_inference,
    time_training,
    time_training_idle_and_busy,
)

__all__ = ["main"]

logger = logging.getLogger("dino_d2.benchmark")

# Inference and training defaults: (num_iter, warmup, batch_size, height, width).
_DEFAULTS = {False: (50, 5, 1, 800, 1333), True: (5, 2, 2, 640, 640)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument("--train", action="store_true", help="time training steps")
    parser.add_argument("--num-iter", type=int, help="timed iterations (50; --train: 5)")
    parser.add_argument("--warmup", type=int, help="iterations run before timing (5; --train: 2)")
    parser.add_argument("--batch-size", type=int, help="images per iteration (1; --train: 2)")
    parser.add_argument("--height", type=int, help="random input height (800; --train: 640)")
    parser.add_argument("--width", type=int, help="random input width (1333; --train: 640)")
    parser.add_argument("--num-boxes", type=int, default=5, help="--train: boxes per image")
    parser.add_argument(
        "--dataset", action="store_true", help="use the config's test loader, not random images"
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="--train: also time steps while N other processes keep cores busy",
    )
    parser.add_argument(
        "--busy-block", type=int, default=3, help="timed steps per idle or busy block with --busy"
    )
    parser.add_argument(
        "--busy-settle",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="untimed steps at the start of each block with --busy, so the threads can adapt",
    )
    parser.add_argument(
        "--amp",
        choices=["bfloat16", "float16"],
        help="mixed precision: inference under autocast to this dtype; --train: train.amp on "
        "with this precision (float16 with a GradScaler; CUDA only)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    names = ("num_iter", "warmup", "batch_size", "height", "width")
    for name, default in zip(names, _DEFAULTS[args.train]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("num_iter", "batch_size", "height", "width", "busy_block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.busy < 0 or args.busy_settle < 0:
        parser.error("--warmup, --busy and --busy-settle must not be negative")
    if args.train and args.dataset:
        parser.error("--dataset is for inference; --train uses random images and boxes")
    if args.train and args.num_boxes < 1:
        parser.error("--num-boxes must be at least 1")
    if args.busy and not args.train:
        parser.error("--busy times training steps: add --train")


def _inference(args, cfg, device) -> dict:
    model = instantiate(cfg.model).to(device).eval()
    num_batches = args.warmup + args.num_iter
    if args.dataset:
        batches = dataset_batches(cfg, num_batches, args.batch_size)
        source = f"dataset {OmegaConf.select(cfg, 'dataloader.test.dataset.names')}"
    else:
        batches = random_batches(num_batches, args.batch_size, args.height, args.width)
        source = f"random {args.height}x{args.width}"
    logger.info(f"Device: {device}; inputs: {source}; batch size {args.batch_size}")
    amp_dtype = getattr(torch, args.amp) if args.amp else None
    return {"input": source, **time_inference(model, batches, args.warmup, amp_dtype=amp_dtype)}


def _training(args, cfg, device) -> dict:
    num_classes = cfg.model.num_classes
    batch = random_batches(
        1, args.batch_size, args.height, args.width, num_boxes=args.num_boxes,
        num_classes=num_classes,
    )[0]  # fmt: skip
    source = f"random {args.height}x{args.width}, {args.num_boxes} boxes/image"
    logger.info(f"Device: {device}; training inputs: {source}; batch size {args.batch_size}")
    setup = build_training(cfg, batch, device)
    if args.busy:
        timings = time_training_idle_and_busy(
            setup,
            args.num_iter,
            args.warmup,
            block=args.busy_block,
            busy_processes=args.busy,
            settle_s=args.busy_settle,
        )
    else:
        timings = time_training(setup, args.num_iter, args.warmup)
    return {"input": source, **timings}


def _print(results: dict) -> None:
    head = f"{results['input']}, batch {results['batch_size']} on {results['device']}"
    head += f" ({results['torch_threads']} threads)"
    if results["mode"] == "train":
        print(f"{head}, training step:")
        print(
            f"  seconds per step: median {results['step_s_median']:.3f}, "
            f"min {results['step_s_min']:.3f}"
        )
        if "busy_ratio" in results:
            print(
                f"  with {results['busy_processes']} busy process(es): median "
                f"{results['busy_step_s_median']:.3f} s, {results['busy_ratio']:.2f}x idle "
                f"(per round: {', '.join(f'{r:.2f}' for r in results['busy_ratio_per_round'])})"
            )
            print(
                f"  CPUs used by other processes: idle blocks {results['others_cpus_idle']}, "
                f"busy blocks {results['others_cpus_busy']}"
            )
    else:
        print(f"{head}, {results['num_iter']} iterations:")
        print(
            f"  latency per image: median {results['latency_ms_median']:.1f} ms, "
            f"mean {results['latency_ms_mean']:.1f} ms ({results['images_per_s']:.2f} images/s)"
        )
    print(f"  peak RSS: {results['peak_rss_mb']:.0f} MiB")
    if results.get("cuda_max_memory_allocated_mb") is not None:
        print(f"  CUDA max allocated: {results['cuda_max_memory_allocated_mb']:.0f} MiB")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s"
    )
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if args.train and args.amp:
        cfg.train.amp.enabled = True
        cfg.train.amp.precision = args.amp
    device = resolve_device(OmegaConf.select(cfg, "train.device", default=None))
    measure = _training if args.train else _inference
    timings = measure(args, cfg, device)
    results = {
        "config": args.config_file,
        "mode": "train" if args.train else "inference",
        "device": str(device),
        "batch_size": args.batch_size,
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "amp": args.amp,
        "torch_threads": torch.get_num_threads(),
        **timings,
        "peak_rss_mb": peak_rss_mb(),
        "rss_mb": psutil.Process().memory_info().rss / 1024**2,
    }
    if args.json:
        print(json.dumps(results))
    else:
        _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
