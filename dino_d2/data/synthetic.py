"""A synthetic COCO json shaped like Objects365, written streaming, for testing and measuring the
data path at any size (the images need not exist).

Shape (defaults, the full Objects365 v2 train set): 1,740,000 images in ``patch<k>/`` folders
(50 patches at full size), about 14.4 boxes per image (negative binomial: most images have a
few boxes, some over a hundred), 365 categories with Zipf-like frequencies (the most frequent
class about 100 times the median's; category ids are a seeded permutation of ``1..365``, so the
frequent ones are not the first ids), image sizes like Objects365's (mostly 1024 pixels on the
long side, landscape and portrait) and about 1% crowd boxes.

The file is written in chunks of images: only one chunk's numbers are in memory at a time.
Each chunk draws from its own generator (``seed``, chunk index), so the images and the
annotations sections (written in two passes, in either order) agree, and the same ``seed`` writes
the same file.
"""

import math
import os
from typing import Dict

import numpy as np

__all__ = ["OBJECTS365_IMAGES", "OBJECTS365_CLASSES", "write_synthetic_coco"]

OBJECTS365_IMAGES = 1_740_000
OBJECTS365_CLASSES = 365
_CHUNK = 10_000  # images per chunk
_PATCH = 34_800  # images per patch<k>/ folder (50 patches at full size)
_LONG_SIDES = np.array([1024, 1024, 1024, 800, 683, 640, 1280])
_ASPECTS = np.array([0.75, 0.75, 0.5625, 0.667, 1.0, 1.333, 1.5])
_DISPERSION = 1.5  # negative binomial shape of the boxes per image: a long tail


def _chunk(seed: int, index: int, num_images: int, mean_boxes: float, class_p: np.ndarray):
    """The images ``[index * _CHUNK, ...)``: their sizes, and their boxes (one row each)."""
    rng = np.random.default_rng([seed, index])
    n = min(_CHUNK, num_images - index * _CHUNK)
    long_side = rng.choice(_LONG_SIDES, n)
    aspect = rng.choice(_ASPECTS, n)
    width = np.where(aspect <= 1, long_side, np.round(long_side / aspect)).astype(np.int64)
    height = np.where(aspect <= 1, np.round(long_side * aspect), long_side).astype(np.int64)
    p = _DISPERSION / (_DISPERSION + mean_boxes)
    counts = rng.negative_binomial(_DISPERSION, p, n)
    image = np.repeat(np.arange(n), counts)
    w_img, h_img = width[image], height[image]
    # Box sides: log-uniform from 1% to 90% of the image side.
    w = w_img * np.exp(rng.uniform(math.log(0.01), math.log(0.9), len(image)))
    h = h_img * np.exp(rng.uniform(math.log(0.01), math.log(0.9), len(image)))
    x = rng.uniform(0, 1, len(image)) * (w_img - w)
    y = rng.uniform(0, 1, len(image)) * (h_img - h)
    classes = rng.choice(len(class_p), len(image), p=class_p)
    crowd = (rng.uniform(size=len(image)) < 0.01).astype(np.int64)
    # Two decimals, rounded down: x + w stays inside the image.
    boxes = np.floor(np.stack([x, y, w, h], axis=1) * 100) / 100
    return width, height, image, boxes, classes, crowd


def _images_text(first_id: int, width, height) -> str:
    ids = range(first_id, first_id + len(width))
    return ",\n".join(
        f'{{"id": {i}, "file_name": "patch{(i - 1) // _PATCH}/objects365_{i:08d}.jpg", '
        f'"width": {w}, "height": {h}}}'
        for i, w, h in zip(ids, width.tolist(), height.tolist())
    )


def _annotations_text(first_id, first_image_id, image, boxes, classes, crowd, category_ids):
    rows = zip(image.tolist(), boxes.tolist(), category_ids[classes].tolist(), crowd.tolist())
    return ",\n".join(
        f'{{"id": {first_id + k}, "image_id": {first_image_id + i}, "category_id": {c}, '
        f'"bbox": [{x}, {y}, {w}, {h}], "area": {round(w * h, 2)}, "iscrowd": {z}}}'
        for k, (i, (x, y, w, h), c, z) in enumerate(rows)
    )


def write_synthetic_coco(
    path: str,
    *,
    num_images: int = OBJECTS365_IMAGES,
    mean_boxes: float = 14.4,
    num_classes: int = OBJECTS365_CLASSES,
    seed: int = 0,
    annotations_first: bool = False,
    zipf_exponent: float = 1.0,
) -> Dict[str, int]:
    """Writes the synthetic json (see the module docstring) to ``path``.

    Args:
        path: the json file to write (its folder is created).
        num_images: images, with ids ``1..num_images``.
        mean_boxes: mean boxes per image.
        num_classes: categories, named ``class_<id>``.
        seed: the seed of every draw.
        annotations_first: write ``annotations`` before ``images`` (COCO jsons come in both
            orders).
        zipf_exponent: class ``r`` (by frequency rank, from 1) has probability proportional to
            ``r ** -zipf_exponent``.

    Returns:
        ``{"images": ..., "annotations": ..., "bytes": ...}`` written.
    """
    if num_images < 1 or num_classes < 1 or mean_boxes <= 0:
        raise ValueError(
            f"num_images ({num_images}) and num_classes ({num_classes}) must be >= 1 and "
            f"mean_boxes ({mean_boxes}) > 0"
        )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ranks = np.arange(1, num_classes + 1, dtype=np.float64)
    class_p = ranks**-zipf_exponent / (ranks**-zipf_exponent).sum()
    category_ids = np.random.default_rng([seed, 1 << 40]).permutation(num_classes) + 1
    chunks = range(math.ceil(num_images / _CHUNK))
    total_boxes = 0

    def write_list(f, key):
        nonlocal total_boxes
        f.write(f'"{key}": [\n')
        first = True
        next_box = 1
        for index in chunks:
            width, height, image, boxes, classes, crowd = _chunk(
                seed, index, num_images, mean_boxes, class_p
            )
            first_image = index * _CHUNK + 1
            if key == "images":
                text = _images_text(first_image, width, height)
            else:
                text = _annotations_text(
                    next_box, first_image, image, boxes, classes, crowd, category_ids
                )
                next_box += len(image)
            if text:
                f.write(("" if first else ",\n") + text)
                first = False
        f.write("\n]")
        if key == "annotations":
            total_boxes = next_box - 1

    categories = ",\n".join(
        f'{{"id": {i}, "name": "class_{i}", "supercategory": "thing"}}'
        for i in range(1, num_classes + 1)
    )
    order = ("annotations", "images") if annotations_first else ("images", "annotations")
    with open(path, "w") as f:
        f.write("{")
        for key in order:
            write_list(f, key)
            f.write(",\n")
        f.write(f'"categories": [\n{categories}\n]}}\n')
    return {"images": num_images, "annotations": total_boxes, "bytes": os.path.getsize(path)}
