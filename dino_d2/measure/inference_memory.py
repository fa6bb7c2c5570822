"""The peak resident memory of an inference process, measured in a fresh Python process.

The process does what ``tools/demo.py`` does for one image: it imports the predictor and the
config loader, builds the config's model, loads its weights (``--weights``; none: the random
initial ones), sets the allocator as the demo does (:func:`dino_d2.utils.allocator.
unmap_large_blocks`) and detects objects in one random ``--height`` x ``--width`` uint8 image
(resized as the config's test loader resizes: 800x1333 stays 800x1333), in the precision
``--amp`` names (float32 without it). It prints one JSON line::

    {"imports_rss_mb": ..., "built_rss_mb": ..., "peak_rss_mb": ..., "height": 800, ...}

``imports_rss_mb`` is the peak resident memory once the imports are done, ``built_rss_mb`` once
the model is built and loaded, ``peak_rss_mb`` at the end (``ru_maxrss``: everything counts,
imports included)::

    python -m dino_d2.measure.inference_memory --config-file configs/dino_r50_4scale_12ep.py

:func:`inference_process_memory` starts that process from another one (``tools/benchmark.py``),
so that what the caller already holds does not count.
"""

import argparse
import json
import sys
from typing import Dict, Optional, Sequence

from .memory import peak_rss_mb
from .processes import MeasuredProcessError, run_measured_process

__all__ = ["InferenceProcessError", "inference_process_memory", "main"]


class InferenceProcessError(MeasuredProcessError):
    """The measured inference process failed; the message holds the end of its stderr."""


def inference_process_memory(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    height: int = 800,
    width: int = 1333,
    amp: Optional[str] = None,
    weights: Optional[str] = None,
    unsafe_load: bool = False,
) -> Dict:
    """Runs one inference in a fresh process (``python -m dino_d2.measure.inference_memory``)
    and returns what it prints.

    Args:
        config_file: a LazyConfig ``.py`` or saved ``.yaml``.
        opts: ``key=value`` config overrides.
        height, width: of the random image, in pixels.
        amp: "bfloat16" or "float16" to run under ``torch.autocast``; None: full precision.
        weights: a checkpoint to load; None keeps the random initial weights.
        unsafe_load: load ``weights`` with full unpickling (only a file you trust).

    Returns:
        ``imports_rss_mb``, ``built_rss_mb``, ``peak_rss_mb`` (MiB), ``height``, ``width``,
        ``amp``, ``weights`` and ``num_detections``.

    Raises:
        InferenceProcessError: the process failed (its stderr's end is in the message).
    """
    command = [sys.executable, "-m", __name__, "--config-file", config_file]
    command += ["--height", str(height), "--width", str(width)]
    if amp:
        command += ["--amp", amp]
    if weights:
        command += ["--weights", weights]
    if unsafe_load:
        command.append("--unsafe-load")
    command += ["--", *opts]
    return run_measured_process(command, InferenceProcessError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dino_d2.measure.inference_memory",
        description="Peak resident memory of one inference in this fresh process.",
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument("--height", type=int, default=800, help="random image height")
    parser.add_argument("--width", type=int, default=1333, help="random image width")
    parser.add_argument("--amp", choices=["bfloat16", "float16"], help="run under autocast")
    parser.add_argument("--weights", help="a checkpoint to load (default: random weights)")
    parser.add_argument("--unsafe-load", action="store_true", help="full unpickling of --weights")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.height < 1 or args.width < 1:
        _parser().error(f"--height and --width must be positive, got {args.height}x{args.width}")
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    # What an inference process imports (tools/demo.py without its drawing), and nothing else.
    import numpy as np
    from detectron2.config import LazyConfig

    from ..engine.predictor import Predictor
    from ..model_zoo import load_config_file
    from ..utils.allocator import unmap_large_blocks

    imports = peak_rss_mb()
    unmap_large_blocks()
    cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), opts)
    # The precision asked for, not the config's eval_precision: --amp or float32.
    predictor = Predictor(
        cfg,
        checkpoint=args.weights or "",
        unsafe_load=args.unsafe_load,
        precision=args.amp or "float32",
    )
    built = peak_rss_mb()
    generator = np.random.default_rng(0)
    image = generator.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    instances = predictor(image)
    result = {
        "imports_rss_mb": imports,
        "built_rss_mb": built,
        "peak_rss_mb": peak_rss_mb(),
        "height": args.height,
        "width": args.width,
        "amp": args.amp,
        "weights": args.weights,
        "num_detections": len(instances),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
