#!/usr/bin/env python
"""Generate the digits demo dataset (COCO format) used by the digits configs and the demo.

Example::

    python tools/make_digits_dataset.py --root datasets/digits --seed 0

An existing complete dataset with the same parameters is kept (nothing is regenerated);
``--overwrite`` regenerates it. See ``dino_d2/data/digits.py`` for the layout.
"""

import argparse
import logging
import os
import sys
import time

from dino_d2.data.datasets import default_datasets_root
from dino_d2.data.digits import digits_dataset_info, ensure_digits_dataset, generate_digits_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(default_datasets_root(), "digits"),
        help="dataset folder (default: $DETECTRON2_DATASETS/digits, else datasets/digits)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-val", type=int, default=300, help="validation images")
    parser.add_argument("--image-size", type=int, default=320, help="side of the square images")
    parser.add_argument("--overwrite", action="store_true", help="regenerate an existing dataset")
    parser.add_argument("--log-every", type=int, default=500, help="progress every N images")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        log_every=args.log_every,
    )
    start = time.perf_counter()
    existed = digits_dataset_info(args.root) is not None
    if args.overwrite:
        root = generate_digits_dataset(args.root, overwrite=True, **options)
        existed = False
    else:
        root = ensure_digits_dataset(args.root, **options)
    info = digits_dataset_info(root)
    if existed:
        print(f"digits dataset already present at {root}")
    else:
        print(f"wrote the digits dataset to {root} in {time.perf_counter() - start:.1f} s")
    for split, counts in info["splits"].items():
        first, stop = counts["digit_indices"]
        print(
            f"  {split}: {counts['images']} images, {counts['annotations']} digits "
            f"(source digits {first}..{stop - 1}) -> {os.path.join(root, split)}, "
            f"{os.path.join(root, 'annotations', split + '.json')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
