"""The embedded demo dataset: real handwritten digits pasted on noisy coloured canvases.

The digits are scikit-learn's copy of the UCI optical-recognition handwritten digits
(``sklearn.datasets.load_digits``: 1,797 grey 8x8 images, 10 classes, shipped with scikit-learn,
so nothing is downloaded). Each generated image is an ``image_size`` square canvas of one random
colour plus per-pixel Gaussian noise (grey grain, standard deviation 4 to 16 levels), with 1 to 6
digits pasted on it:

* each digit is upscaled (bicubic) from 8x8 to a square of 16 to 64 pixels, placed at a random
  position fully inside the canvas, and drawn in a random colour whose luminance differs from
  the background's by at least 96 (of 255), blended by the digit's intensity
  (``alpha = intensity / 16``);
* the ink boxes of the digits of one image overlap with IoU at most 0.3 (a digit that finds no
  such place in 50 tries is left out, so an image can have fewer digits than drawn);
* training images use only source digits ``0..1499`` and validation images only ``1500..1796``,
  so validation handwriting is never seen in training.

On-disk layout (COCO instances format, one folder per split)::

    root/
      train/000001.png ...        num_train RGB PNGs, file name = image id
      val/000001.png ...          num_val RGB PNGs
      annotations/train.json      COCO json for root/train
      annotations/val.json        COCO json for root/val
      COMPLETE.json               completion marker, written last: parameters and counts

Annotation conventions:

* ``bbox`` is COCO ``[x, y, w, h]`` in absolute integer pixels: the tight box of the digit's
  visible ink (upscaled pixels with ``alpha >= 0.3``), not the pasted square, whose 8x8 source
  has blank margins. Pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``. ``area`` is
  ``w * h``; there is no segmentation.
* ``category_id`` is COCO-like, ``1..10``, for digits ``"0".."9"`` (``category_id = digit + 1``),
  so Detectron2's ``load_coco_json`` maps it to contiguous ids ``0..9`` equal to the digit.
* image and annotation ids start at 1 (pycocotools' COCOeval treats id 0 as "unmatched").
* the extra field ``digit_index`` is the index of the source digit in ``load_digits()``.

Generation is deterministic: every image has its own random generator seeded by
``(seed, split, image index)``, so the same arguments give byte-identical files (with the same
numpy, Pillow and zlib). It is atomic: everything is written into a hidden temporary folder next
to ``root`` that is renamed to ``root`` only once complete, so an interrupted run never leaves a
dataset that looks complete (a killed run can leave a ``.<name>.incomplete-*`` folder behind,
which is safe to delete).
"""

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "DIGIT_CLASSES",
    "TRAIN_DIGITS",
    "VAL_DIGITS",
    "MARKER_NAME",
    "generate_digits_dataset",
    "ensure_digits_dataset",
    "digits_dataset_info",
]

logger = logging.getLogger(__name__)

DIGIT_CLASSES = tuple(str(d) for d in range(10))
"""Class names in contiguous-id order: contiguous id ``d`` is the digit ``d``."""
TRAIN_DIGITS = range(0, 1500)
"""Indices into ``sklearn.datasets.load_digits()`` the training images draw from."""
VAL_DIGITS = range(1500, 1797)
"""Indices the validation images draw from (disjoint from the training ones)."""
MARKER_NAME = "COMPLETE.json"

# Bump when the rendering or the layout changes: an existing dataset of another version is
# then reported as different instead of being silently reused.
_FORMAT_VERSION = 1
_SPLITS = (("train", TRAIN_DIGITS), ("val", VAL_DIGITS))
_MAX_DIGITS = 6
_DIGIT_SIZES = (16, 64)
_MAX_IOU = 0.3
_INK_THRESHOLD = 0.3
_MIN_LUMINANCE_GAP = 96.0
_NOISE_SIGMAS = (4.0, 16.0)
_PLACEMENT_TRIES = 50
_LUMA = np.array([0.299, 0.587, 0.114])
_PNG_COMPRESS_LEVEL = 1


@functools.lru_cache(maxsize=1)
def _source_digits() -> Tuple[np.ndarray, np.ndarray]:
    """Returns ``(images (1797, 8, 8) uint8 in [0, 255], labels (1797,) int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _digit_alpha(digit: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upscale of an 8x8 uint8 digit to ``(size, size)`` float32 alpha in [0, 1]."""
    image = Image.fromarray(digit, mode="L").resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def _ink_box(alpha: np.ndarray) -> Tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` (end exclusive) of the pixels with ``alpha >= 0.3``."""
    ink = alpha >= min(_INK_THRESHOLD, float(alpha.max()))
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    """IoU of two XYXY boxes."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour whose luminance is at least 96 away from the background's.

    A random hue is darkened (on a light background) or lightened (on a dark one) to a luminance
    drawn uniformly from the contrasting range.
    """
    colour = rng.uniform(0.0, 255.0, size=3)
    luminance = float(colour @ _LUMA)
    background_luminance = float(background @ _LUMA)
    if background_luminance >= 127.5:
        target = rng.uniform(0.0, background_luminance - _MIN_LUMINANCE_GAP)
        colour = colour * (target / max(luminance, 1e-3))
    else:
        target = rng.uniform(background_luminance + _MIN_LUMINANCE_GAP, 255.0)
        colour = 255.0 - (255.0 - colour) * ((255.0 - target) / max(255.0 - luminance, 1e-3))
    return np.clip(colour, 0.0, 255.0)


def _render_image(
    rng: np.random.Generator, digit_range: range, image_size: int
) -> Tuple[np.ndarray, List[Dict[str, int]]]:
    """Draws one canvas.

    Returns:
        ``(image (H, W, 3) uint8, digits)``; each digit is a dict with ``digit_index``,
        ``label`` (0..9) and its ink box ``x0, y0, x1, y1`` (absolute pixels, end exclusive).
    """
    images, labels = _source_digits()
    background = rng.integers(0, 256, size=3).astype(np.float32)
    sigma = rng.uniform(*_NOISE_SIGMAS)
    # One noise value per pixel, shared by the channels (grain): the PNGs are about half the
    # size they are with independent per-channel noise.
    noise = rng.standard_normal(size=(image_size, image_size, 1), dtype=np.float32) * sigma
    canvas = background + noise
    np.clip(canvas, 0.0, 255.0, out=canvas)

    placed: List[Dict[str, int]] = []
    for _ in range(int(rng.integers(1, _MAX_DIGITS + 1))):
        index = int(rng.integers(digit_range.start, digit_range.stop))
        size = int(rng.integers(_DIGIT_SIZES[0], _DIGIT_SIZES[1] + 1))
        alpha = _digit_alpha(images[index], size)
        ink = _ink_box(alpha)
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, image_size - size + 1))
            y = int(rng.integers(0, image_size - size + 1))
            box = (x + ink[0], y + ink[1], x + ink[2], y + ink[3])
            others = ((p["x0"], p["y0"], p["x1"], p["y1"]) for p in placed)
            if all(_iou(box, other) <= _MAX_IOU for other in others):
                break
        else:
            continue
        colour = _contrasting_colour(rng, background).astype(np.float32)
        weight = alpha[:, :, None]
        region = canvas[y : y + size, x : x + size]
        region *= 1.0 - weight
        region += colour * weight
        placed.append(
            {
                "digit_index": index,
                "label": int(labels[index]),
                "x0": box[0],
                "y0": box[1],
                "x1": box[2],
                "y1": box[3],
            }
        )
    np.clip(canvas, 0.0, 255.0, out=canvas)
    return np.rint(canvas, out=canvas).astype(np.uint8), placed


class _Progress:
    """Logs every ``every`` images (never when ``every`` is 0)."""

    def __init__(self, total: int, every: int):
        self.total, self.every, self.done = total, every, 0
        self.start = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.every and (self.done % self.every == 0 or self.done == self.total):
            elapsed = time.perf_counter() - self.start
            logger.info(f"digits: {self.done}/{self.total} images written ({elapsed:.1f} s)")


def _write_split(
    folder: str,
    split: str,
    split_id: int,
    digit_range: range,
    num_images: int,
    image_size: int,
    seed: int,
    progress: _Progress,
) -> Dict[str, int]:
    """Writes ``folder/<split>/*.png`` and ``folder/annotations/<split>.json``; returns counts."""
    os.makedirs(os.path.join(folder, split))
    coco_images, coco_annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_id, index])
        image, digits = _render_image(rng, digit_range, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(image, mode="RGB").save(
            os.path.join(folder, split, file_name), format="PNG", compress_level=_PNG_COMPRESS_LEVEL
        )
        coco_images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for digit in digits:
            width, height = digit["x1"] - digit["x0"], digit["y1"] - digit["y0"]
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit["label"] + 1,
                    "bbox": [digit["x0"], digit["y0"], width, height],
                    "area": width * height,
                    "iscrowd": 0,
                    "digit_index": digit["digit_index"],
                }
            )
        progress.step()
    dataset = {
        "info": {
            "description": "dino_d2 digits demo dataset: sklearn load_digits on noisy canvases",
            "version": str(_FORMAT_VERSION),
            "split": split,
            "seed": seed,
            "digit_indices": [digit_range.start, digit_range.stop],
        },
        "licenses": [],
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [
            {"id": d + 1, "name": name, "supercategory": "digit"}
            for d, name in enumerate(DIGIT_CLASSES)
        ],
    }
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    with open(os.path.join(folder, "annotations", f"{split}.json"), "w") as f:
        json.dump(dataset, f, separators=(",", ":"))
    return {"images": len(coco_images), "annotations": len(coco_annotations)}


def _parameters(num_train: int, num_val: int, image_size: int, seed: int) -> Dict[str, int]:
    for name, value, low in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("image_size", image_size, _DIGIT_SIZES[1]),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return {
        "format_version": _FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }


def digits_dataset_info(root: str) -> Optional[Dict[str, Any]]:
    """The content of ``root/COMPLETE.json`` (parameters and counts), or None when incomplete."""
    marker = os.path.join(os.fspath(root), MARKER_NAME)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)


def generate_digits_dataset(
    root: str,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    image_size: int = 320,
    seed: int = 0,
    overwrite: bool = False,
    log_every: int = 500,
) -> str:
    """Generates the digits dataset at ``root`` (see the module docstring for the layout).

    A 320x320 PNG takes about 140 KB (the noise does not compress), so the default 2,300 images
    take about 320 MB and some 30 s of one CPU core.

    Args:
        root: the dataset folder to create; its parent is created if needed.
        num_train: number of training images (digits ``0..1499`` of ``load_digits``).
        num_val: number of validation images (digits ``1500..1796``).
        image_size: side of the square canvases, in pixels (at least 64).
        seed: the random seed; the same arguments give byte-identical files.
        overwrite: replace an existing ``root``; otherwise an existing ``root`` is an error.
        log_every: log progress every this many images (0: never).

    Returns:
        the absolute path of ``root``.

    Raises:
        FileExistsError: ``root`` exists and ``overwrite`` is False.
    """
    parameters = _parameters(num_train, num_val, image_size, seed)
    root = os.path.abspath(os.fspath(root))
    if os.path.lexists(root) and not overwrite:
        raise FileExistsError(f"{root} already exists; pass overwrite=True to replace it")
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=parent)
    replaced = None
    try:
        progress = _Progress(parameters["num_train"] + parameters["num_val"], log_every)
        counts = {}
        for split_id, (split, digit_range) in enumerate(_SPLITS):
            counts[split] = _write_split(
                staging,
                split,
                split_id,
                digit_range,
                parameters[f"num_{split}"],
                parameters["image_size"],
                parameters["seed"],
                progress,
            )
            counts[split]["digit_indices"] = [digit_range.start, digit_range.stop]
        with open(os.path.join(staging, MARKER_NAME), "w") as f:
            json.dump({"parameters": parameters, "splits": counts}, f, indent=2)
        os.chmod(staging, 0o755)
        if os.path.lexists(root):
            replaced = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rename(root, os.path.join(replaced, name))
        os.rename(staging, root)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    logger.info(f"digits: dataset written to {root}")
    return root


def ensure_digits_dataset(
    root: str,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    image_size: int = 320,
    seed: int = 0,
    log_every: int = 500,
) -> str:
    """Generates the digits dataset at ``root`` unless a complete one is already there.

    Safe to call from several processes at once: each generates into its own temporary folder
    and the ones that lose the final rename keep the winner's (identical) dataset.

    Args:
        root, num_train, num_val, image_size, seed, log_every: as in
            :func:`generate_digits_dataset`.

    Returns:
        the absolute path of ``root``.

    Raises:
        FileExistsError: ``root`` exists but holds no completion marker (not written by this
            module, or by a different tool); it is never deleted.
        ValueError: the dataset at ``root`` was generated with other parameters.
    """
    parameters = _parameters(num_train, num_val, image_size, seed)
    root = os.path.abspath(os.fspath(root))
    info = digits_dataset_info(root)
    if info is None:
        if os.path.lexists(root):
            raise FileExistsError(
                f"{root} exists but is not a complete digits dataset (no {MARKER_NAME}); "
                "delete it or choose another root"
            )
        try:
            generate_digits_dataset(
                root,
                num_train=num_train,
                num_val=num_val,
                image_size=image_size,
                seed=seed,
                log_every=log_every,
            )
        except OSError:
            if digits_dataset_info(root) is None:
                raise
        info = digits_dataset_info(root)
    if info["parameters"] != parameters:
        raise ValueError(
            f"the digits dataset at {root} was generated with {info['parameters']}, "
            f"not {parameters}; delete it, choose another root or match its parameters"
        )
    return root
