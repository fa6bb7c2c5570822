"""Parameters and FLOPs of a dino_d2 config, counted with fvcore.

    python tools/analyze_model.py --config-file configs/dino_r50_4scale_12ep.py
    python tools/analyze_model.py --config-file configs/dino_r50_4scale_12ep.py --tasks flop \
        --height 800 --width 1333 train.device=cpu

FLOPs follow fvcore's convention (one fused multiply-add counts as one flop) and are measured by
tracing inference on random images of the given size (:func:`dino_d2.measure.flops.count_macs`,
which also counts the deformable attention op).
"""

import argparse
import logging
from collections import Counter

import torch
from fvcore.nn import parameter_count, parameter_count_table

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.logger import setup_logger

from dino_d2.measure.flops import count_macs
from dino_d2.model_zoo import load_config_file

__all__ = ["count_flops", "count_parameters", "main"]

logger = logging.getLogger("dino_d2.analyze_model")


def build_model(cfg, device):
    model = instantiate(cfg.model)
    model.to(device)
    model.eval()
    return model


def count_parameters(model) -> str:
    counts = parameter_count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = counts.get("backbone.bottom_up", 0)
    lines = [
        f"parameters: {counts[''] / 1e6:.2f}M total, {backbone / 1e6:.2f}M backbone, "
        f"{trainable / 1e6:.2f}M trainable",
        parameter_count_table(model, max_depth=3),
    ]
    return "\n".join(lines)


def count_flops(model, height, width, num_inputs, device) -> str:
    totals = []
    by_operator = Counter()
    for i in range(num_inputs):
        generator = torch.Generator().manual_seed(i)
        image = torch.rand(3, height, width, generator=generator).mul(255).to(device)
        total, counts = count_macs(model, image)
        totals.append(total)
        by_operator.update(counts)
        logger.info(f"input {i + 1}/{num_inputs}: {totals[-1] / 1e9:.1f} GFLOPs")
    lines = [
        f"GFLOPs at {height}x{width}: {sum(totals) / len(totals) / 1e9:.1f} (mean of {num_inputs})"
    ]
    for name, flops in by_operator.most_common():
        lines.append(f"  {name}: {flops / num_inputs / 1e9:.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py or saved .yaml")
    parser.add_argument(
        "--tasks", default="parameter,flop", help="comma-separated: parameter, flop"
    )
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--num-inputs", type=int, default=1, help="random images to average")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    tasks = set(args.tasks.split(","))
    if not tasks <= {"parameter", "flop"}:
        parser.error(f"--tasks takes parameter and/or flop, got {args.tasks!r}")
    setup_logger(name="dino_d2")
    setup_logger(name="fvcore", abbrev_name="fvcore")

    cfg = LazyConfig.apply_overrides(load_config_file(args.config_file), args.opts)
    device = cfg.train.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    if "parameter" in tasks:
        print(count_parameters(model))
    if "flop" in tasks:
        with torch.no_grad():
            print(count_flops(model, args.height, args.width, args.num_inputs, device))
    return 0
