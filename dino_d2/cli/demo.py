"""Run a dino_d2 LazyConfig on images: one visualised PNG per image and a JSON of detections.

    python tools/demo.py --config-file configs/dino_r18_digits.py \\
        --checkpoint output/digits/model_final.pth --input photo.jpg more/ "shots/*.png" \\
        --output demo_out --score-threshold 0.5
    # a model without weights (its random initial ones), e.g. to measure time or memory
    python tools/demo.py --config-file configs/dino_r50_4scale_12ep.py --random-weights \\
        --input photo.jpg --output demo_out
    # key=value config overrides come last, after an option other than --input (or after --)
    python tools/demo.py --config-file ... --input a.jpg b.jpg --output out train.device=cpu

``--input`` takes image files, folders (their images, not recursive) and glob patterns. The
images are resized as the config's test data loader resizes them
(``dataloader.test.mapper.augmentations``) and read in the model's ``input_format``; boxes are
reported in absolute XYXY pixels of the original image. Class names come from the metadata of
the config's test dataset (``dataloader.test.dataset.names``; dino_d2's builtin datasets such as
``digits_val`` are registered on demand), else the class ids are used as labels.

``OUTPUT/<image name>.png`` holds each visualisation and ``OUTPUT/detections.json``::

    {"config": ..., "checkpoint": ..., "score_threshold": 0.3,
     "images": [{"file": "photo.jpg", "height": 480, "width": 640,
                 "visualization": "photo.png",
                 "detections": [{"box": [x0, y0, x1, y1], "score": 0.91,
                                 "class_id": 3, "class_name": "3"}, ...]}, ...],
     "skipped": [{"file": "broken.jpg", "error": "..."}]}

A model that predicts masks (``Instances.pred_masks``, (N, H, W) bool at the original image
size, as Mask DINO gives) has them drawn by Detectron2's ``Visualizer`` (filled and outlined,
labelled at the mask), and each detection gets ``"mask"``: its COCO RLE
(``{"size": [H, W], "counts": str}``, pycocotools' ``mask.decode`` reads it).

Existing files are never replaced unless ``--overwrite`` is given. An image that cannot be read
stops the run with an error naming it; ``--skip-bad-images`` warns and goes on instead.
"""

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from pycocotools import mask as mask_util

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

from dino_d2.checkpoint import UntrustedFileError, add_unsafe_load_argument
from dino_d2.data import register_builtin_datasets
from dino_d2.engine.predictor import Predictor
from dino_d2.model_zoo import UnsafeConfigError, load_config_file
from dino_d2.utils.allocator import unmap_large_blocks

__all__ = [
    "DemoError",
    "collect_images",
    "plan_outputs",
    "load_metadata",
    "run_demo",
    "main",
]

logger = logging.getLogger("dino_d2.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DETECTIONS_FILE = "detections.json"


class DemoError(Exception):
    """A problem with the command line's inputs or outputs, reported without a traceback."""


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Expands files, folders (their images, sorted, not recursive) and glob patterns.

    Files named explicitly are kept whatever their extension and even when missing (reading
    them reports the problem); duplicates are dropped.

    Raises:
        DemoError: a folder without images or a pattern that matches no image.
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(item, name))
            )
            if not found:
                raise DemoError(f"the folder {item} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif _has_glob_magic(item) and not os.path.exists(item):
            found = sorted(
                p
                for p in glob.glob(item)
                if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise DemoError(f"no image matches {item!r}")
        else:
            found = [item]
        paths.extend(found)
    return list(dict.fromkeys(paths))


def _output_names(paths: Sequence[str]) -> List[str]:
    """``<stem>.png`` for each input; inputs sharing a stem get ``<stem>_1.png``, ... in order."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 0
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        names.append(name)
    return names


def plan_outputs(images: Sequence[str], output_dir: str, overwrite: bool) -> List[str]:
    """The visualisation file names of ``images`` in ``output_dir``.

    Raises:
        DemoError: one of the output files exists and ``overwrite`` is False.
    """
    names = _output_names(images)
    targets = [os.path.join(output_dir, n) for n in [*names, DETECTIONS_FILE]]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        shown = ", ".join(existing[:3])
        if len(existing) > 3:
            shown += f" and {len(existing) - 3} more"
        raise DemoError(f"{shown} already exist(s); use --overwrite to replace")
    return names


def load_metadata(cfg, num_classes: Optional[int]) -> Metadata:
    """The metadata of the config's (first) test dataset, when it is registered and has
    ``thing_classes`` for every class of the model; else an empty one (numeric labels).

    dino_d2's builtin datasets (e.g. ``digits_val``) are registered here if needed.
    """
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None)
    if names is None:
        return Metadata()
    name = names if isinstance(names, str) else (list(names) or [None])[0]
    if name is None:
        return Metadata()
    register_builtin_datasets([name])
    if name not in DatasetCatalog.list():
        logger.info(f"Test dataset '{name}' is not registered: labels are class ids")
        return Metadata()
    metadata = MetadataCatalog.get(name)
    classes = metadata.get("thing_classes", None)
    if not classes:
        return Metadata()
    if num_classes is not None and len(classes) < num_classes:
        logger.warning(
            f"'{name}' names {len(classes)} classes but the model has {num_classes}: "
            "labels are class ids"
        )
        return Metadata()
    return metadata


def _read(path: str, image_format: str) -> np.ndarray:
    try:
        image = read_image(path, format=image_format)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
        raise DemoError(f"cannot read image {path}: {e}") from e
    if image.ndim != 3 or image.shape[2] != 3:
        raise DemoError(f"cannot use image {path}: expected 3 channels, got shape {image.shape}")
    return image


def _to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    return image[:, :, ::-1] if image_format == "BGR" else image


def _draw(image: np.ndarray, instances, metadata: Metadata):
    """Detectron2's ``Visualizer`` drawing of ``instances`` on ``image`` ((H, W, 3) RGB uint8).

    Imported here, not with the module: it loads matplotlib, which detecting does not need.
    """
    from detectron2.utils.visualizer import Visualizer

    return Visualizer(image, metadata).draw_instance_predictions(instances)


def _mask_rle(mask) -> Dict:
    """COCO RLE of one (H, W) bool mask, with ``str`` counts (JSON)."""
    rle = mask_util.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _detections(instances, class_names: Sequence[str]) -> List[Dict]:
    boxes = instances.pred_boxes.tensor.tolist()
    scores = instances.scores.tolist()
    classes = instances.pred_classes.tolist()
    masks = instances.pred_masks if instances.has("pred_masks") else None
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    detections = []
    for i in order:
        detection = {
            "box": [round(v, 2) for v in boxes[i]],
            "score": round(scores[i], 4),
            "class_id": classes[i],
            "class_name": class_names[classes[i]] if class_names else str(classes[i]),
        }
        if masks is not None:
            detection["mask"] = _mask_rle(masks[i])
        detections.append(detection)
    return detections


def run_demo(
    predictor: Predictor,
    images: Sequence[str],
    output_dir: str,
    *,
    metadata: Metadata,
    score_threshold: float = 0.3,
    overwrite: bool = False,
    skip_bad_images: bool = False,
    extra: Optional[Dict] = None,
) -> Dict:
    """Detects, visualises and writes ``output_dir/<name>.png`` and ``detections.json``.

    Args:
        predictor: the model.
        images: image files.
        output_dir: created if missing.
        metadata: for the labels (``thing_classes``) of the visualisation and the JSON.
        score_threshold: detections below it are dropped.
        overwrite: replace existing output files (otherwise an error before any work).
        skip_bad_images: warn about and skip unreadable images instead of stopping.
        extra: more top-level entries of the JSON (config, checkpoint, ...).

    Returns:
        the content of ``detections.json``.
    """
    names = plan_outputs(images, output_dir, overwrite)
    os.makedirs(output_dir, exist_ok=True)

    class_names = list(metadata.get("thing_classes", None) or [])
    results = {**(extra or {}), "score_threshold": score_threshold, "images": [], "skipped": []}
    for index, (path, name) in enumerate(zip(images, names), start=1):
        try:
            image = _read(path, predictor.input_format)
        except DemoError as e:
            if not skip_bad_images:
                raise
            logger.warning(f"[{index}/{len(images)}] skipped: {e}")
            results["skipped"].append({"file": path, "error": str(e)})
            continue
        start = time.perf_counter()
        instances = predictor(image)
        seconds = time.perf_counter() - start
        instances = instances[instances.scores >= score_threshold]

        _draw(_to_rgb(image, predictor.input_format), instances, metadata).save(
            os.path.join(output_dir, name)
        )
        results["images"].append(
            {
                "file": path,
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
                "visualization": name,
                "detections": _detections(instances, class_names),
            }
        )
        logger.info(
            f"[{index}/{len(images)}] {path}: {len(instances)} detection(s) "
            f"with score >= {score_threshold} in {seconds:.2f}s -> {name}"
        )
    with open(os.path.join(output_dir, DETECTIONS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument("--output", required=True, help="folder for the PNGs and detections.json")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint", default=None, help="weights to load (default: train.init_checkpoint)"
    )
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="load no weights: the model keeps its random initial ones (for timing and memory)",
    )
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="warn about unreadable images and go on"
    )
    add_unsafe_load_argument(parser, "--checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.opts[:1] == ["--"]:
        args.opts = args.opts[1:]
    setup_logger(name="dino_d2")
    setup_logger(name="fvcore", abbrev_name="fvcore")

    try:
        images = collect_images(args.input)
        if args.checkpoint and "://" not in args.checkpoint and not os.path.isfile(args.checkpoint):
            raise DemoError(f"the checkpoint {args.checkpoint} does not exist")
        plan_outputs(images, args.output, args.overwrite)  # fail before building the model
        unmap_large_blocks()  # a lower peak memory: freed tensors go back to the system
        cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), args.opts)
        checkpoint = "" if args.random_weights else args.checkpoint
        predictor = Predictor(cfg, checkpoint=checkpoint, unsafe_load=args.unsafe_load)
        logger.info(f"Device: {predictor.device}; {len(images)} image(s) -> {args.output}")
        metadata = load_metadata(cfg, OmegaConf.select(cfg, "model.num_classes", default=None))
        run_demo(
            predictor,
            images,
            args.output,
            metadata=metadata,
            score_threshold=args.score_threshold,
            overwrite=args.overwrite,
            skip_bad_images=args.skip_bad_images,
            extra={"config": args.config_file, "checkpoint": predictor.checkpoint},
        )
    except (DemoError, UntrustedFileError, UnsafeConfigError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    logger.info(f"Wrote {os.path.join(args.output, DETECTIONS_FILE)}")
    return 0
