"""Write a synthetic COCO json shaped like Objects365 (streaming; the images need not exist).

    python tools/make_synthetic_coco.py /data/o365_synthetic.json             # full size
    python tools/make_synthetic_coco.py /data/o365_synthetic_1.json --scale 0.01
    python tools/make_synthetic_coco.py out.json --num-images 1000 --annotations-first

See :mod:`dino_d2.data.synthetic` for the shape. ``--scale`` multiplies the number of images
(the boxes follow). Prints the number of images and boxes and the file's size.
"""

import argparse
import sys

from dino_d2.data.synthetic import OBJECTS365_CLASSES, OBJECTS365_IMAGES, write_synthetic_coco

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("output", help="the json file to write")
    parser.add_argument(
        "--num-images", type=int, default=OBJECTS365_IMAGES, help="images before --scale"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --num-images")
    parser.add_argument("--boxes-per-image", type=float, default=14.4, help="mean boxes")
    parser.add_argument("--num-classes", type=int, default=OBJECTS365_CLASSES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--annotations-first", action="store_true", help="write annotations before images"
    )
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    num_images = round(args.num_images * args.scale)
    if num_images < 1:
        parser.error(f"--num-images x --scale is {num_images}; it must be at least 1")
    written = write_synthetic_coco(
        args.output,
        num_images=num_images,
        mean_boxes=args.boxes_per_image,
        num_classes=args.num_classes,
        seed=args.seed,
        annotations_first=args.annotations_first,
    )
    print(
        f"{args.output}: {written['images']:,} images, {written['annotations']:,} boxes, "
        f"{args.num_classes} categories, {written['bytes'] / 1e6:,.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
