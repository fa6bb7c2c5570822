#!/usr/bin/env python
"""Convert a DINO checkpoint of another code base, or backbone weights, to a dino_d2 checkpoint.

    python tools/convert_checkpoint.py --source idea checkpoint0011_4scale.pth dino_r50_4scale.pth
    python tools/convert_checkpoint.py --source maskdino \
        maskdino_r50_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask46.3ap_box51.7ap.pth \
        maskdino_r50.pth    # the authors' Mask DINO; check with tools/verify_maskdino_conversion.py

The last line printed is ``config overrides: key=value ...``: append those overrides to the
config named on the line before (``config: ...``) when evaluating or training, e.g.

    python tools/lazyconfig_train_net.py --config-file configs/dino_r50_4scale_12ep.py \\
        --eval-only train.init_checkpoint=dino_r50_4scale.pth <overrides>

Nothing is written unless the converted file loads strictly into the model that config and
those overrides build.
"""

import argparse
import os
import sys

from dino_d2.checkpoint import (
    SOURCES,
    ConversionError,
    UntrustedFileError,
    add_unsafe_load_argument,
    convert_checkpoint,
    load_checkpoint_file,
    save_checkpoint,
)
from dino_d2.model_zoo import UnsafeConfigError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, choices=SOURCES, help="layout of INPUT")
    parser.add_argument("input", metavar="INPUT", help="checkpoint to convert")
    parser.add_argument(
        "output", metavar="OUTPUT", help="dino_d2 checkpoint to write (.pth or .pkl)"
    )
    parser.add_argument(
        "--config",
        help="dino_d2 config (shipped name such as dino_r50_4scale_12ep.py, or a path) that the "
        "overrides refer to and the result is verified against; default: the shipped config "
        "closest to the checkpoint",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help="keep class rows 0..N-1 (default: the authors' 91-row COCO heads become the 80 "
        "COCO classes, other heads are kept whole)",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="convert the authors' 'ema_model' weights"
    )
    add_unsafe_load_argument(parser, "INPUT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.input, unsafe=args.unsafe_load)
        result = convert_checkpoint(
            args.source,
            checkpoint,
            config=args.config,
            num_classes=args.num_classes,
            use_ema=args.use_ema,
        )
        del checkpoint
        save_checkpoint(result, args.output)
    except (ConversionError, UntrustedFileError, UnsafeConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    kind = "backbone initialization" if result.backbone_only else "detector"
    print(f"wrote {args.output}: {len(result.state_dict)} tensors ({kind}, from {args.source})")
    shipped = not os.path.isfile(result.config)
    print(f"config: {'configs/' + result.config if shipped else result.config}")
    print(result.overrides_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
