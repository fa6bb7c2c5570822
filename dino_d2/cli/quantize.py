"""Quantize an ONNX export to int8 for OpenVINO, and write it only if its accuracy holds.

    python tools/deploy/quantize.py --config-file configs/dino_r18_digits.py \\
        --model export/model.onnx --output export_int8/
    # the whole model in int8 (nothing kept in float), written whatever its AP
    python tools/deploy/quantize.py ... --float-parts none --force

The export (``tools/deploy/export_model.py --format onnx``) is calibrated by NNCF on
``--calibration-images`` training images (the config's ``dataloader.train.dataset.names``)
through the config's test-time mapper, with ``--float-parts`` kept in float (default: the
decoder with its heads, the encoder's proposal heads and the deformable-attention sampling; see
:mod:`dino_d2.export.quantize`). Then the float32 export and the int8 model both run in OpenVINO
(``INFERENCE_PRECISION_HINT`` f32) on the config's test set; both APs are printed, and
``model_int8.xml`` / ``.bin`` and ``model_int8.json`` are written to ``--output`` only when the
int8 box AP is within ``--max-ap-drop`` of the float32 one (or with ``--force``). Exit code 0:
written; 1: refused; 2: bad input.

``--latency N`` also times, paired in one process, the PyTorch model (its weights:
``train.init_checkpoint=...``) and OpenVINO f32, bf16 (on CPUs with bfloat16 instructions) and
int8 on N test images, one image at a time, and prints the medians.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger

from dino_d2.checkpoint import add_unsafe_load_argument
from dino_d2.cli.export_model import load_model
from dino_d2.export.evaluate import ExportedDetector, coco_ap
from dino_d2.export.exporter import ExportError, load_openvino
from dino_d2.export.quantize import (
    FLOAT_PARTS,
    accept_int8,
    calibration_inputs,
    openvino_bf16_supported,
    quantize_int8,
    save_openvino,
)
from dino_d2.model_zoo import UnsafeConfigError, load_config_file

__all__ = ["main", "paired_latency", "parse_args"]


class QuantizeError(Exception):
    """Bad input to the tool; the message names it."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the config the export was made of")
    parser.add_argument("--model", required=True, help="model.onnx (model.json beside it)")
    parser.add_argument("--output", required=True, help="folder for model_int8.xml/.bin/.json")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument(
        "--float-parts",
        nargs="+",
        default=list(FLOAT_PARTS),
        choices=list(FLOAT_PARTS) + ["none"],
        help="parts kept in float ('none': quantize the whole model)",
    )
    parser.add_argument("--max-ap-drop", type=float, default=1.0, help="box AP points")
    parser.add_argument("--force", action="store_true", help="write the int8 model whatever its AP")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--latency", type=int, default=0, metavar="N", help="time on N images")
    add_unsafe_load_argument(parser, "train.init_checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def _read_preprocessing(model_path: str) -> Dict:
    path = os.path.splitext(model_path)[0] + ".json"
    if not os.path.isfile(model_path):
        raise QuantizeError(f"--model {model_path}: no such file (an ONNX export is expected)")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{path}: cannot read the export's JSON ({e})") from e
    for key in ("input_dtype", "min_input_size", "outputs"):
        if key not in info:
            raise QuantizeError(f"{path}: no {key!r}; expected the JSON export_model writes")
    if info.get("format") != "onnx":
        raise QuantizeError(f"{path}: format {info.get('format')!r}, expected 'onnx'")
    return info


def paired_latency(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds of each callable, timed in turns (one call of each per round, after one
    warm-up round), so that a change in the machine's load reaches all of them alike."""
    import statistics
    import time

    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _latency(cfg, model, info: Dict, onnx_path: str, int8_path: str, num_images: int) -> None:
    from dino_d2.layers.fast_path import optimize_for_cpu_inference

    dtype = getattr(torch, info["input_dtype"])
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
    inputs = calibration_inputs(cfg, num_images, dtype, info["min_input_size"], dataset=names)
    optimize_for_cpu_inference(model)
    runtimes = {
        "OpenVINO f32": load_openvino(onnx_path, "f32"),
        "OpenVINO int8": load_openvino(int8_path, "f32"),
    }
    if openvino_bf16_supported():
        runtimes["OpenVINO bf16"] = load_openvino(onnx_path, "bf16")
    feeds = [(torch.from_numpy(f["images"]), torch.from_numpy(f["image_sizes"])) for f in inputs]

    def eager(images, sizes):
        with torch.no_grad():
            return model.detect(images, sizes)

    def over_feeds(run: Callable) -> Callable[[], list]:
        return lambda: [run(images, sizes) for images, sizes in feeds]

    runs = {"PyTorch eager f32": eager, **runtimes}
    medians = paired_latency({name: over_feeds(run) for name, run in runs.items()}, repeats=3)
    reference = medians["PyTorch eager f32"]
    print(f"Latency per image, one at a time over {len(feeds)} test images (median of 3, paired):")
    for name, seconds in medians.items():
        print(
            f"  {name:18s} {seconds / len(feeds) * 1000:8.1f} ms ({seconds / reference:.2f}x eager)"
        )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logger(name="dino_d2")
    try:
        info = _read_preprocessing(args.model)
        parts = [] if "none" in args.float_parts else args.float_parts
        int8_path = os.path.join(args.output, "model_int8.xml")
        outputs = [int8_path, os.path.splitext(int8_path)[0] + ".bin", int8_path[:-4] + ".json"]
        existing = [path for path in outputs if os.path.exists(path)]
        if existing and not args.overwrite:
            raise QuantizeError(f"{', '.join(existing)} exist(s); use --overwrite to replace")
        cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), args.opts)
        model = load_model(cfg, args.unsafe_load)
        dtype = getattr(torch, info["input_dtype"])
        calibration = calibration_inputs(
            cfg, args.calibration_images, dtype, info["min_input_size"]
        )
        print(
            f"Calibrating on {len(calibration)} training images; kept in float: "
            + (", ".join(parts) if parts else "nothing (the whole model in int8)")
        )
        quantized = quantize_int8(args.model, calibration, parts)
        extra_names = list(info["outputs"])[3:]

        def box_ap(path: str) -> float:
            detector = ExportedDetector(
                load_openvino(path, "f32"),
                dtype,
                info["min_input_size"],
                postprocess=model.postprocess,
                extra_names=extra_names,
            )
            return coco_ap(cfg, detector)["bbox"]

        with tempfile.TemporaryDirectory() as folder:
            staged = os.path.join(folder, "model_int8.xml")
            save_openvino(quantized, staged)
            decision = accept_int8(box_ap(args.model), box_ap(staged), args.max_ap_drop)
            print(f"OpenVINO on the test set: {decision.message}")
            if args.latency:
                _latency(cfg, model, info, args.model, staged, args.latency)
            if not decision.accepted and not args.force:
                print(
                    f"{os.path.basename(sys.argv[0])}: refused: the int8 model loses more than "
                    f"{args.max_ap_drop} box AP; nothing written (--force writes it anyway)",
                    file=sys.stderr,
                )
                return 1
            os.makedirs(args.output, exist_ok=True)
            for suffix in (".xml", ".bin"):
                shutil.copyfile(staged[:-4] + suffix, int8_path[:-4] + suffix)
        described = {
            **info,
            "format": "openvino-int8",
            "model": os.path.basename(int8_path),
            "quantization": {
                "tool": "nncf",
                "calibration_images": len(calibration),
                "float_parts": {part: FLOAT_PARTS[part][1] for part in parts},
                "box_ap": decision.message,
                "forced": not decision.accepted,
            },
        }
        with open(outputs[2], "w") as f:
            json.dump(described, f, indent=2)
        print(f"Wrote {int8_path} and {outputs[2]}")
    except (ExportError, QuantizeError, UnsafeConfigError, ValueError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    return 0
