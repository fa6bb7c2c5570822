"""Inference latency, or training-step time, and memory of a dino_d2 config.

    # inference: random 800x1333 images, batch 1; the matrix-math limit and the fast path's parity
    python tools/benchmark.py --config-file configs/dino_r50_4scale_12ep.py
    # the same model exported to ONNX, in onnxruntime and OpenVINO, against eager
    python tools/benchmark.py --config-file configs/dino_r50_4scale_12ep.py --num-iter 5 \\
        --onnx export/model.onnx --openvino
    python tools/benchmark.py --config-file configs/dino_r18_digits.py --dataset --num-iter 20 \\
        --batch-size 2 --json train.device=cpu
    # training iterations (the training script's, on one repeated batch: no data loader)
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
``--train`` times the iterations of ``tools/lazyconfig_train_net.py``, built by the same code
(:func:`dino_d2.engine.build_training`: the training transform, the config's optimizer,
gradient clipping, mixed precision, learning-rate schedule, EMA and compute threads), on one
batch of random images with ``--num-boxes`` random ground-truth boxes each, repeated instead of
a data loader; only the job's checkpoints, evaluations and metric files are left out.
``--warmup`` iterations are run first and not timed.

``--busy N`` starts N spinning processes (another user's jobs) during every other block of
steps (``--busy-settle`` seconds of untimed steps, then ``--busy-block`` timed ones; ``--num-iter``
rounds of an idle and a busy block) and reports the busy / idle ratio of the median step times.

Inference also reports, unless ``--no-limit`` / ``--no-parity``:

* the matrix-math limit of this machine: fvcore's multiply-accumulate count of the model on
  the first input, divided by the rate of a large ``torch.mm`` at the same thread count, and the
  ratio of the measured latency to it;
* the fast path's parity: the timed model, transformed by
  :func:`dino_d2.layers.fast_path.optimize_for_cpu_inference` (folded batch norms, channels-last
  backbone, oneDNN's fused linears), against the plain model it was made from, on the first
  batch (with random frozen batch-norm statistics when the weights are random, so that folding
  changes something).

``--onnx FILE`` (and ``--openvino``), ``--node-onnx FILE`` (an export whose deformable
attention is dino_d2's own node, ``--msda-backend node``, run in onnxruntime with dino_d2's custom
op library and, with ``--openvino``, in OpenVINO with dino_d2's extension), ``--pt2 FILE`` and
``--aoti FILE`` time exported models
(``tools/deploy/export_model.py``) on the same images, padded into one uint8 (or, per the
export's ``model.json``, float) batch, in the same run as the eager model, and compare their
detections with the eager model's. The config, overrides and ``--weights`` must be those of the
export: without the export's checkpoint the eager model has other weights and the comparison
fails. ``--weights`` is read without running code it may carry, and ``--pt2`` / ``--aoti`` (a
program whose loading can run code) are only loaded with ``--unsafe-load``, for files you trust;
``model.json`` is read as data, each value checked.

``--alternate ROUNDS`` then times the eager model and each export again, each alone in a fresh
process, alternating for ROUNDS rounds, and reports each export's latency against the eager
model's of the same round: a 2-core VM's speed drifts by up to 20% between the blocks of one
process, and runtimes timed side by side in one process slow each other with their thread
pools.

``--baseline-s SECONDS`` prints the speed-up against an earlier figure; with
``--baseline-sgemm GMACS`` (the float32 GEMM rate of the machine that figure came from) also
scaled to this machine's (the fastest library's, as in the limit).

``--train`` keeps freed memory in the heap as the training script does
(:func:`dino_d2.utils.allocator.keep_freed_memory`, reported as ``kept_freed_memory``).

Reported: median, mean and minimum time per image (inference) or per step (training), the
process's peak resident memory (``ru_maxrss``: building the model counts too; this process also
holds the plain model and the inputs), for inference that of a fresh process which imports,
builds, loads and runs one image of ``--height`` x ``--width`` (with ``--amp``) and nothing else,
beside its imports alone (:mod:`dino_d2.measure.inference_memory`; ``--no-process-memory`` skips
it), the number of
compute threads and, on CUDA, ``torch.cuda.max_memory_allocated`` during the timed iterations.
``--json`` prints them as one JSON line on stdout (the progress goes to stderr). The exit code
is 1 when the fast path's or an export's detections differ from the eager model's.
"""

import argparse
import itertools
import json
import logging
import os
import sys

import psutil
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate

import dino_d2.modeling  # noqa: F401  (registers DINO and the backbones)
from dino_d2.checkpoint import AtomicCheckpointer, UntrustedFileError, add_unsafe_load_argument
from dino_d2.engine import build_training, resolve_device
from dino_d2.export.exporter import load_exported, load_onnxruntime, load_openvino
from dino_d2.layers.fast_path import optimized_copy
from dino_d2.measure import (
    ExportInfoError,
    MeasuredProcessError,
    alternate,
    dataset_batches,
    export_batches,
    fast_path_parity,
    fastest_gemm,
    inference_limit,
    inference_process_memory,
    peak_rss_mb,
    perturb_frozen_batchnorm,
    random_batches,
    time_inference,
    time_training,
    time_export,
    time_exported,
    time_training_idle_and_busy,
)
from dino_d2.model_zoo import UnsafeConfigError, load_config_file
from dino_d2.utils.allocator import keep_freed_memory

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
    parser.add_argument(
        "--no-limit", action="store_true", help="inference: skip the matrix-math limit"
    )
    parser.add_argument(
        "--no-parity", action="store_true", help="inference: skip the fast path's parity check"
    )
    parser.add_argument(
        "--no-process-memory",
        action="store_true",
        help="inference: skip the peak memory of a fresh inference process",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="inference: a checkpoint to load (the one an export was made from); by default the "
        "model keeps its initial weights",
    )
    parser.add_argument("--onnx", metavar="FILE", help="also time this ONNX export")
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also run the --onnx and --node-onnx files in OpenVINO (pip install openvino; "
        "float32 precision)",
    )
    parser.add_argument(
        "--node-onnx",
        metavar="FILE",
        help="also time this ONNX export made with --msda-backend node, in onnxruntime with "
        "dino_d2's custom op library (and in OpenVINO with --openvino)",
    )
    # The flag's name when only OpenVINO ran the node: it implies --openvino.
    parser.add_argument("--openvino-onnx", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument(
        "--pt2", metavar="FILE", help="also time this torch.export program (needs --unsafe-load)"
    )
    parser.add_argument(
        "--aoti", metavar="FILE", help="also time this AOTInductor package (needs --unsafe-load)"
    )
    parser.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time the eager model and each export alone in fresh processes, alternated, "
        "for ROUNDS rounds (a ratio per round)",
    )
    # A child of --alternate: this one runtime's latency alone, as one JSON line.
    parser.add_argument("--only", metavar="RUNTIME", help=argparse.SUPPRESS)
    add_unsafe_load_argument(
        parser,
        "--weights, and allow --pt2 / --aoti (a torch.export program falls back to full "
        "unpickling, an AOTInductor package is compiled code)",
    )
    parser.add_argument(
        "--baseline-s",
        type=float,
        metavar="SECONDS",
        help="an earlier seconds per image (inference) or per step (--train) to compare with",
    )
    parser.add_argument(
        "--baseline-sgemm",
        type=float,
        metavar="GMACS",
        help="the float32 GEMM rate (GMAC/s) of the machine --baseline-s was measured on",
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
    if args.openvino_onnx:
        if args.node_onnx:
            parser.error("--openvino-onnx is the former name of --node-onnx: give one of them")
        args.node_onnx, args.openvino = args.openvino_onnx, True
    exported = [args.onnx, args.node_onnx, args.pt2, args.aoti]
    if args.train and any(exported):
        parser.error("--onnx, --node-onnx, --pt2 and --aoti time inference: drop --train")
    if args.alternate < 0:
        parser.error("--alternate must not be negative")
    if args.alternate and not any(exported):
        parser.error(
            "--alternate times the eager model against exports: give --onnx, "
            "--node-onnx, --pt2 or --aoti"
        )
    if args.openvino and not (args.onnx or args.node_onnx):
        parser.error("--openvino runs the --onnx or --node-onnx file: give one of them")
    for flag, path in (("--pt2", args.pt2), ("--aoti", args.aoti)):
        if path and not args.unsafe_load:
            parser.error(
                f"{flag} {path}: loading it can run code (torch.export.load falls back to full "
                "unpickling; an AOTInductor package is compiled code). Give --unsafe-load if you "
                "trust the file (one you exported yourself)"
            )
    for flag, path in zip(("--onnx", "--node-onnx", "--pt2", "--aoti"), exported):
        if path and not os.path.isfile(path):
            parser.error(
                f"{flag} {path}: no such file (write it with tools/deploy/export_model.py)"
            )
    if args.weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    if args.baseline_sgemm is not None and args.baseline_s is None:
        parser.error("--baseline-sgemm scales --baseline-s: give --baseline-s too")
    for name in ("baseline_s", "baseline_sgemm"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def _exported_runtimes(args):
    """``(name, path, loader)`` for each export to time."""
    runtimes = []
    if args.onnx:
        runtimes.append(("onnxruntime", args.onnx, lambda p: load_exported(p, "onnx")))
    if args.openvino and args.onnx:
        runtimes.append(("openvino", args.onnx, load_openvino))
    if args.node_onnx:
        runtimes.append(("onnxruntime_msda_op", args.node_onnx, load_onnxruntime))
    if args.openvino and args.node_onnx:
        runtimes.append(("openvino_msda_op", args.node_onnx, load_openvino))
    if args.pt2:
        runtimes.append(("pt2", args.pt2, lambda p: load_exported(p, "pt2")))
    if args.aoti:
        runtimes.append(("aoti", args.aoti, lambda p: load_exported(p, "aoti")))
    return runtimes


def _time_exports(args, model, batches) -> dict:
    """Each export on the same images as the eager model: latency and parity with it."""
    results = {}
    for name, path, load in _exported_runtimes(args):
        logger.info(f"{name}: {path}")
        results[name] = time_export(path, load, model, batches, args.warmup)
    return results


def _eager_model(args, cfg, device):
    """The config's model on ``device`` in eval mode, with ``--weights`` loaded."""
    model = instantiate(cfg.model).to(device).eval()
    if args.weights:
        AtomicCheckpointer(model, unsafe_load=args.unsafe_load).load(args.weights)
    return model


def _inference_batches(args, cfg):
    """The inputs of every iteration (warm-up and timed) and what they are."""
    num_batches = args.warmup + args.num_iter
    if args.dataset:
        batches = dataset_batches(cfg, num_batches, args.batch_size)
        return batches, f"dataset {OmegaConf.select(cfg, 'dataloader.test.dataset.names')}"
    batches = random_batches(num_batches, args.batch_size, args.height, args.width)
    return batches, f"random {args.height}x{args.width}"


def _inference(args, cfg, device) -> dict:
    # The plain model is kept for the fast path's parity; the transformed copy is timed.
    plain = _eager_model(args, cfg, device)
    model = optimized_copy(plain)
    batches, source = _inference_batches(args, cfg)
    logger.info(f"Device: {device}; inputs: {source}; batch size {args.batch_size}")
    amp_dtype = getattr(torch, args.amp) if args.amp else None
    results = {"input": source, **time_inference(model, batches, args.warmup, amp_dtype=amp_dtype)}
    # Peak memory of the timed inference; what follows builds more.
    results["peak_rss_mb"] = peak_rss_mb()
    if not args.no_process_memory:
        logger.info("Measuring the peak memory of one inference in a fresh process")
        results["inference_process"] = inference_process_memory(
            args.config_file,
            args.opts,
            height=args.height,
            width=args.width,
            amp=args.amp,
            weights=args.weights,
            unsafe_load=args.unsafe_load,
        )
    batches = [[{"image": item["image"].to(device)} for item in batch] for batch in batches]
    if not args.no_limit:
        logger.info("Counting the model's multiply-accumulates and timing the GEMM libraries")
        latency = results["latency_ms_median"] / 1000
        results.update(inference_limit(model, batches[0][0]["image"], latency, amp_dtype))
    if not args.no_parity:
        if not args.weights:
            # Freshly built, frozen batch norms are the identity and folding them changes
            # nothing: give them statistics (after timing, which they could slow by denormals).
            perturb_frozen_batchnorm(plain)
        logger.info("Running the same weights without the fast path")
        comparison = fast_path_parity(plain, batches[0])
        results["fast_path_parity"] = comparison.summary()
        results["fast_path_parity_passed"] = comparison.passed
        results["fast_path_max_score_diff"] = comparison.max_score_diff
    exports = _time_exports(args, model, batches)
    if exports:
        results["exported"] = exports
    return results


def _time_alone(args, cfg, device) -> dict:
    """``--only``: the latency of one runtime alone in this process, on the images the parent
    times: ``eager`` (the config's model on the fast path) or an export's name."""
    batches, _ = _inference_batches(args, cfg)
    if args.only == "eager":
        model = optimized_copy(_eager_model(args, cfg, device))
        amp_dtype = getattr(torch, args.amp) if args.amp else None
        return time_inference(model, batches, args.warmup, amp_dtype=amp_dtype)
    for name, path, load in _exported_runtimes(args):
        if name == args.only:
            return time_exported(load(path), export_batches(path, batches), args.warmup)
    raise ValueError(f"--only {args.only}: not eager nor one of the exports given")


# A child of --alternate: the benchmark's own main on the parent's arguments and --only.
_CHILD = "import sys; from dino_d2.cli.benchmark import main; sys.exit(main(sys.argv[1:]))"


def _alternate(args, argv) -> dict:
    """The eager model and each export alone in fresh processes (this benchmark with
    ``--only``), alternated ``args.alternate`` rounds."""
    names = ["eager"] + [name for name, _, _ in _exported_runtimes(args)]
    commands = {name: [sys.executable, "-c", _CHILD, "--only", name, *argv] for name in names}
    return alternate(commands, args.alternate)


def _training(args, cfg, device) -> dict:
    num_classes = cfg.model.num_classes
    batch = random_batches(
        1, args.batch_size, args.height, args.width, num_boxes=args.num_boxes,
        num_classes=num_classes,
    )[0]  # fmt: skip
    source = f"random {args.height}x{args.width}, {args.num_boxes} boxes/image"
    logger.info(f"Device: {device}; training inputs: {source}; batch size {args.batch_size}")
    training = build_training(cfg, device, data_loader=itertools.repeat(batch))
    if args.busy:
        timings = time_training_idle_and_busy(
            training,
            args.num_iter,
            args.warmup,
            block=args.busy_block,
            busy_processes=args.busy,
            settle_s=args.busy_settle,
        )
    else:
        timings = time_training(training, args.num_iter, args.warmup)
    # What train.amp resolved to on this device (precision "auto" may give float32).
    precision = str(training.trainer.amp_dtype or torch.float32).removeprefix("torch.")
    return {"input": source, "train_precision": precision, **timings}


def _baseline(args, results: dict) -> dict:
    """Speed-up against ``--baseline-s``, raw and scaled by the two machines' float32 GEMM
    rates (this machine's: the fastest library's, as in the limit)."""
    if args.baseline_s is None:
        return {}
    measured = (
        results["step_s_median"]
        if results["mode"] == "train"
        else results["latency_ms_median"] / 1000
    )
    out = {"baseline_s": args.baseline_s, "speedup": args.baseline_s / measured}
    if args.baseline_sgemm is not None:
        limits = results.get("limits", {})
        rate = (
            limits["float32"]["gmacs_per_s"]
            if "float32" in limits
            else fastest_gemm(torch.float32, results["device"])["gmacs_per_s"]
        )
        out.update(
            baseline_sgemm_gmacs_per_s=args.baseline_sgemm,
            gemm_gmacs_per_s_float32=rate,
            # The baseline as it would take on this machine, at the same share of the GEMM rate.
            speedup_scaled=args.baseline_s * args.baseline_sgemm / rate / measured,
        )
    return out


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
        if "limit_s" in results:
            print(
                f"  matrix-math limit in {results['precision']}: {results['gmacs']:.1f} GMAC at "
                f"{results['gemm_gmacs_per_s']:.1f} GMAC/s ({results['gemm_library']}) = "
                f"{results['limit_s']:.3f} s; latency / limit = {results['latency_to_limit']:.2f}"
            )
            for name, limit in results["limits"].items():
                rates = ", ".join(f"{lib} {rate:.1f}" for lib, rate in limit["rates"].items())
                emulated = "" if limit["native"] else " (emulated: no native instructions here)"
                print(
                    f"    {name}: GEMM GMAC/s {rates} -> limit {limit['limit_s']:.3f} s{emulated}"
                )
        if "fast_path_parity" in results:
            print(f"  fast path against the plain model: {results['fast_path_parity']}")
        for name, exported in results.get("exported", {}).items():
            ratio = exported["latency_ms_median"] / results["latency_ms_median"]
            print(
                f"  {name} ({exported['path']}): median {exported['latency_ms_median']:.1f} "
                f"ms/image, {ratio:.2f}x eager; {exported['parity']}"
            )
    if "alternated" in results:
        alternated = results["alternated"]
        eager = ", ".join(f"{ms:.1f}" for ms in alternated["reference_latency_ms_median"])
        print(f"  alone in fresh processes, {alternated['rounds']} round(s): eager {eager} ms")
        for name, runtime in alternated["runtimes"].items():
            rounds = ", ".join(f"{r:.2f}" for r in runtime["ratio_per_round"])
            print(f"    {name}: median {runtime['ratio_median']:.2f}x eager (per round {rounds})")
    if "speedup" in results:
        line = f"  against {results['baseline_s']:.3f} s: {results['speedup']:.2f}x faster"
        if "speedup_scaled" in results:
            line += (
                f"; {results['speedup_scaled']:.2f}x with the baseline scaled by float32 GEMM "
                f"rates ({results['baseline_sgemm_gmacs_per_s']:.1f} there, "
                f"{results['gemm_gmacs_per_s_float32']:.1f} GMAC/s here)"
            )
        print(line)
    print(f"  peak RSS of this benchmark process: {results['peak_rss_mb']:.0f} MiB")
    if "inference_process" in results:
        process = results["inference_process"]
        print(
            f"  peak RSS of a fresh inference process (imports, build, load, one "
            f"{process['height']}x{process['width']} image): {process['peak_rss_mb']:.0f} MiB; "
            f"imports alone {process['imports_rss_mb']:.0f} MiB"
        )
    if results.get("cuda_max_memory_allocated_mb") is not None:
        print(f"  CUDA max allocated: {results['cuda_max_memory_allocated_mb']:.0f} MiB")


def main(argv=None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s"
    )
    # Training, as the training script runs it: large activations reuse freed heap memory (no
    # page faults). Inference leaves malloc alone, so that its resident memory follows its use.
    kept_freed_memory = keep_freed_memory() if args.train else False
    try:
        cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), args.opts)
        if args.train and args.amp:
            cfg.train.amp.enabled = True
            cfg.train.amp.precision = args.amp
        device = resolve_device(OmegaConf.select(cfg, "train.device", default=None))
        if args.only:
            print(json.dumps(_time_alone(args, cfg, device)))
            return 0
        measure = _training if args.train else _inference
        timings = measure(args, cfg, device)
        if args.alternate:
            timings["alternated"] = _alternate(args, argv)
    except (
        UntrustedFileError,
        UnsafeConfigError,
        ExportInfoError,
        MeasuredProcessError,  # the inference-memory or an --alternate process failed
    ) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    results = {
        "config": args.config_file,
        "mode": "train" if args.train else "inference",
        "device": str(device),
        "batch_size": args.batch_size,
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "amp": args.amp,
        "kept_freed_memory": kept_freed_memory,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        **timings,
        "rss_mb": psutil.Process().memory_info().rss / 1024**2,
    }
    results.update(_baseline(args, results))
    if args.json:
        print(json.dumps(results))
    else:
        _print(results)
    # A fast path or an export that gives other detections is a failure, not a figure.
    passed = [results.get("fast_path_parity_passed", True)]
    passed += [e["parity_passed"] for e in results.get("exported", {}).values()]
    return 0 if all(passed) else 1
