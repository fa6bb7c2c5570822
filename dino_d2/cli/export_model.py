"""Export a dino_d2 config to ONNX, torch.export (.pt2) or AOTInductor, and prove the export.

    python tools/deploy/export_model.py --config-file configs/dino_r18_digits.py \\
        --format onnx --output export/ train.init_checkpoint=output/digits/model_final.pth
    # gathers instead of GridSample (runtimes such as TensorRT), and COCO AP through onnxruntime
    python tools/deploy/export_model.py --config-file ... --format onnx --msda-backend gather \\
        --output export/ --eval train.init_checkpoint=...
    # dino_d2's own deformable-attention node: onnxruntime and OpenVINO run it with dino_d2's
    # libraries and CPU kernel, faster than the GridSample graph
    python tools/deploy/export_model.py --config-file ... --format onnx --msda-backend node \\
        --output export/ train.init_checkpoint=...

The flags follow Detectron2's ``tools/deploy/export_model.py`` where they apply; the weights are
``train.init_checkpoint=...`` (a model without them keeps its random initial weights, with a
warning). The graph takes the padded image batch ``images (N, 3, H, W)`` (uint8 by default, in
the model's ``input_format``) and ``image_sizes (N, 2)`` int64, and returns ``boxes (N, K, 4)``
(absolute XYXY in each resized image's pixels), ``scores (N, K)`` and ``classes (N, K)``;
``--sample-image`` (default: random) is the image traced. Beside the model, ``model.json``
gives what a runtime must repeat: the input format and dtype, the test resize, the classes,
the smallest padded size. Existing files are never replaced without ``--overwrite``.

Every export is then loaded back and run next to the PyTorch model on new images (three other
sizes, one not a multiple of 32 and one of an extreme aspect ratio, and a batch of three
images of different real sizes); the differences are printed and the exit code is 1 when they
exceed ``--score-tolerance`` / ``--box-tolerance``. ``--eval`` also evaluates the config's test
set with ``COCOEvaluator`` through the export and through the PyTorch model (AP within 0.1);
``--runtime openvino`` runs an ONNX export in OpenVINO for it, at ``--precision f32`` or
``bf16`` (OpenVINO's ``INFERENCE_PRECISION_HINT``; AP within 0.3).
"""

import argparse
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.utils.logger import setup_logger

from dino_d2.checkpoint import AtomicCheckpointer, UntrustedFileError, add_unsafe_load_argument
from dino_d2.cli.demo import load_metadata
from dino_d2.data import read_image
from dino_d2.export.evaluate import ExportedDetector, coco_ap
from dino_d2.export.exporter import (
    FORMATS,
    ExportError,
    export_model,
    load_exported,
    load_openvino,
    min_input_size,
    random_verification,
)
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.onnx import MSDA_ONNX_BACKEND_NAMES, canonical_msda_backend
from dino_d2.layers.fast_path import optimize_for_cpu_inference
from dino_d2.model_zoo import UnsafeConfigError, load_config_file

__all__ = ["load_model", "main", "parse_args", "test_resize", "sample_batch"]

logger = logging.getLogger("dino_d2.export")


def test_resize(cfg) -> Tuple[int, int]:
    """``(short_edge_length, max_size)`` of the config's test resize (ResizeShortestEdge)."""
    augmentations = OmegaConf.select(cfg, "dataloader.test.mapper.augmentations")
    for augmentation in instantiate(augmentations) if augmentations is not None else []:
        if isinstance(augmentation, T.ResizeShortestEdge):
            return int(max(augmentation.short_edge_length)), int(augmentation.max_size)
    raise ExportError(
        "the config's dataloader.test.mapper.augmentations has no ResizeShortestEdge; the "
        "exported model's pre-processing (the test resize) cannot be described"
    )


def _resize(image: np.ndarray, short: int, long: int) -> np.ndarray:
    transform = T.ResizeShortestEdge(short, long).get_transform(image)
    return transform.apply_image(image)


def sample_batch(
    graph: InferenceGraph, short: int, long: int, sample_image: Optional[str]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of two images to trace: the sample image (resized as in testing; random when
    None) and a smaller crop of it."""
    if sample_image:
        image = _resize(read_image(sample_image, graph.model.input_format), short, long)
    else:
        generator = np.random.default_rng(0)
        image = generator.integers(0, 256, (short, min(long, short * 4 // 3), 3), dtype=np.uint8)
    image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).to(graph.dtype)
    height, width = image.shape[-2:]
    minimum = min_input_size(graph)
    batch = torch.zeros((2, 3, max(height, minimum), max(width, minimum)), dtype=graph.dtype)
    crop = (max(height * 3 // 4, 1), max(width * 3 // 4, 1))
    batch[0, :, :height, :width] = image
    batch[1, :, : crop[0], : crop[1]] = image[:, : crop[0], : crop[1]]
    return batch, torch.tensor([[height, width], list(crop)], dtype=torch.int64)


def _preprocessing(cfg, graph: InferenceGraph, short: int, long: int, outputs: List[str]) -> Dict:
    model = graph.model
    extras = {name: "(N, K, ...) the extra head's output at each detection" for name in outputs[3:]}
    metadata = load_metadata(cfg, model.num_classes)
    return {
        "inputs": {
            "images": f"(N, 3, H, W) {graph.input_dtype}, 0-255, padded at the bottom and right",
            "image_sizes": "(N, 2) int64, each image's real (height, width)",
        },
        "outputs": {
            "boxes": "(N, K, 4) float32 absolute XYXY in the resized image's pixels",
            "scores": "(N, K) float32, descending",
            "classes": "(N, K) int64",
            **extras,
        },
        "input_format": model.input_format,
        "input_dtype": graph.input_dtype,
        "resize": {
            "type": "ResizeShortestEdge",
            "short_edge_length": short,
            "max_size": long,
            "interpolation": "bilinear (Pillow)",
        },
        "normalization": {
            "inside_graph": True,
            "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        },
        "size_divisibility": model.size_divisibility,
        "min_input_size": min_input_size(graph),
        "num_select": model.num_select,
        "class_names": list(metadata.get("thing_classes", None) or []),
    }


def _evaluate(cfg, runner, graph: InferenceGraph, extra_names) -> Dict[str, Dict[str, float]]:
    """COCO AP of the PyTorch model and of the export on the config's test set, per task the
    evaluator reports (``bbox``; ``segm`` for a model with masks): ``{"pytorch": {"bbox": AP,
    ...}, "export": {...}}``. The export's outputs go through the model's own post-processing."""
    if "evaluator" not in cfg.dataloader:
        raise ExportError("--eval: the config has no dataloader.evaluator")
    exported = ExportedDetector(
        runner,
        graph.dtype,
        min_input_size(graph),
        postprocess=graph.model.postprocess,
        extra_names=extra_names,
    )
    return {"pytorch": coco_ap(cfg, graph.model), "export": coco_ap(cfg, exported)}


def _runner(args: argparse.Namespace, path: str):
    """The export run by ``--runtime`` at ``--precision``."""
    if args.runtime == "openvino":
        if args.format != "onnx":
            raise ExportError(f"--runtime openvino runs ONNX exports, not --format {args.format}")
        return load_openvino(path, precision=args.precision)
    if args.precision != "f32":
        raise ExportError("--precision bf16 needs --runtime openvino")
    return load_exported(path, args.format)


def load_model(cfg, unsafe_load: bool = False) -> torch.nn.Module:
    """The config's model on the CPU in eval mode, with ``train.init_checkpoint``'s weights (a
    warning and the random initial weights without one).

    Raises:
        ExportError: the weights cannot be loaded (the message names the file and why).
    """
    model = instantiate(cfg.model).to("cpu").eval()
    weights = OmegaConf.select(cfg, "train.init_checkpoint", default="") or ""
    if not weights:
        logger.warning("No train.init_checkpoint: the model keeps its random weights")
        return model
    try:
        AtomicCheckpointer(model, unsafe_load=unsafe_load).load(weights)
    except (OSError, ValueError, UntrustedFileError) as e:  # URLError is an OSError
        raise ExportError(f"cannot load train.init_checkpoint={weights}: {e}") from e
    return model


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line's arguments; the old ``--msda-impl`` is read as ``--msda-backend`` with a
    DeprecationWarning."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", required=True, help="folder for the model and model.json")
    parser.add_argument("--sample-image", help="an image to trace with (default: random)")
    parser.add_argument(
        "--msda-backend",
        choices=MSDA_ONNX_BACKEND_NAMES,
        default="grid_sample",
        help="ONNX form of deformable attention: GridSample, gathers only, or dino_d2's own node "
        "(run by onnxruntime and OpenVINO with dino_d2's libraries, with its CPU kernel; "
        "'openvino' is its former name)",
    )
    # The flag's old name, accepted for one release.
    parser.add_argument(
        "--msda-impl",
        choices=MSDA_ONNX_BACKEND_NAMES,
        dest="deprecated_msda_impl",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer)")
    parser.add_argument(
        "--input-dtype", choices=("uint8", "float32"), default="uint8", help="image input dtype"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--eval",
        "--run-eval",
        dest="eval",
        action="store_true",
        help="also compare the COCO box AP of the export and the model on the test set",
    )
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default="onnxruntime",
        help="what runs the ONNX export for --eval (openvino: pip install -e .[openvino])",
    )
    parser.add_argument(
        "--precision",
        choices=("f32", "bf16"),
        default="f32",
        help="OpenVINO's INFERENCE_PRECISION_HINT for --eval (bf16: AP within 0.3, not 0.1)",
    )
    parser.add_argument("--score-tolerance", type=float, default=1e-4)
    parser.add_argument("--box-tolerance", type=float, default=1e-2, help="pixels")
    add_unsafe_load_argument(parser, "train.init_checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.deprecated_msda_impl is not None:
        warnings.warn(
            "--msda-impl is deprecated and will be removed; use --msda-backend",
            DeprecationWarning,
            stacklevel=2,
        )
        args.msda_backend = args.deprecated_msda_impl
    args.msda_backend = canonical_msda_backend(args.msda_backend)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logger(name="dino_d2")
    setup_logger(name="fvcore", abbrev_name="fvcore")
    try:
        cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), args.opts)
        model = load_model(cfg, args.unsafe_load)
        optimize_for_cpu_inference(model)
        graph = InferenceGraph(model, input_dtype=args.input_dtype)
        short, long = test_resize(cfg)
        sample = sample_batch(graph, short, long, args.sample_image)
        result = export_model(
            graph,
            sample,
            args.format,
            args.output,
            preprocessing=_preprocessing(cfg, graph, short, long, graph.output_names(*sample)),
            verification=random_verification(graph, short, long),
            msda_backend=args.msda_backend,
            opset=args.opset,
            overwrite=args.overwrite,
            score_tolerance=args.score_tolerance,
            box_tolerance=args.box_tolerance,
        )
        print(
            f"Wrote {result.path} ({result.seconds['export']:.1f} s) and {result.preprocessing_path}"
        )
        print(f"Verification against PyTorch ({args.format}): {result.verification.summary()}")
        passed = result.verification.passed
        if args.eval:
            extra_names = graph.output_names(*sample)[3:]
            ap = _evaluate(cfg, _runner(args, result.path), graph, extra_names)
            tolerance = 0.3 if args.precision == "bf16" else 0.1
            runtime = args.runtime if args.format == "onnx" else args.format
            for task, reference in ap["pytorch"].items():
                exported = ap["export"].get(task, float("nan"))
                ok = abs(exported - reference) <= tolerance
                print(
                    f"COCO {task} AP: PyTorch {reference:.2f}, export {exported:.2f} "
                    f"({runtime} {args.precision}; difference {abs(exported - reference):.3f}, "
                    f"at most {tolerance}: {'PASS' if ok else 'FAIL'})"
                )
                passed &= ok
    except (ExportError, UnsafeConfigError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    return 0 if passed else 1
