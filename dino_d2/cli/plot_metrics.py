"""Plot the loss and AP curves of a training run from Detectron2's ``metrics.json``.

    python tools/plot_metrics.py output/digits/metrics.json --output curves.png
    # more loss terms beside total_loss, a longer smoothing window
    python tools/plot_metrics.py output/digits/metrics.json --output curves.png \\
        --keys loss_class,loss_bbox,loss_giou --smooth 50

``metrics.json`` has one JSON object per line, each with an ``iteration`` and scalars such as
``total_loss``, ``loss_*``, ``lr`` and, after an evaluation, ``bbox/AP``, ``bbox/AP50``, ... The
figure has two panels: the losses against the iteration (the raw values faint, a centred moving
average of ``--smooth`` points solid; by default a tenth of the points, at most 20) and the AP
curves. A resumed run may log an iteration
twice; the later line wins. From Python::

    plot_metrics("output/digits/metrics.json", "curves.png", loss_keys=["total_loss"])
"""

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_LOSS_KEYS",
    "DEFAULT_AP_KEYS",
    "default_window",
    "load_metrics",
    "moving_average",
    "plot_metrics",
    "main",
]

DEFAULT_LOSS_KEYS = ("total_loss",)
DEFAULT_AP_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75")

Series = Tuple[np.ndarray, np.ndarray]


def load_metrics(metrics_path: str) -> List[Dict]:
    """The records of a ``metrics.json``, in file order.

    A last line cut short (a run still writing) is ignored; a malformed line elsewhere is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, or no record with an ``iteration``.
    """
    with open(metrics_path) as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{metrics_path}, line {number}: not JSON ({e})") from e
        if isinstance(record, dict) and "iteration" in record:
            records.append(record)
    if not records:
        raise ValueError(f"{metrics_path} has no metrics records (JSON objects with 'iteration')")
    return records


def _series(records: Sequence[Dict], key: str) -> Series:
    """Iterations and finite values of ``key``, sorted by iteration; repeated iterations keep
    the last value logged."""
    values = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[int(record["iteration"])] = float(value)
    iterations = np.array(sorted(values), dtype=np.int64)
    return iterations, np.array([values[i] for i in iterations], dtype=np.float64)


def default_window(num_points: int) -> int:
    """The default smoothing window for ``num_points`` logged values: a tenth, 1 to 20."""
    return min(20, max(1, num_points // 10))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points (fewer at the ends, no lag); ``window <= 1`` copies."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values.copy()
    sums = np.cumsum(np.concatenate([[0.0], values]))
    centres = np.arange(len(values))
    starts = np.maximum(centres - window // 2, 0)
    ends = np.minimum(centres - window // 2 + window, len(values))
    return (sums[ends] - sums[starts]) / (ends - starts)


def _available(records: Sequence[Dict]) -> List[str]:
    return sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})


def plot_metrics(
    metrics_path: str,
    output_path: str,
    *,
    loss_keys: Optional[Sequence[str]] = None,
    ap_keys: Sequence[str] = DEFAULT_AP_KEYS,
    smooth: Optional[int] = None,
    title: Optional[str] = None,
) -> Dict[str, Series]:
    """Writes a PNG with the loss curves (top) and the AP curves (bottom) against the iteration.

    Args:
        metrics_path: a Detectron2 ``metrics.json``.
        output_path: the PNG to write (its folder is created).
        loss_keys: loss scalars to plot, each of which must be in the file; None plots
            ``total_loss`` when present.
        ap_keys: evaluation scalars to plot when present, e.g. ``bbox/AP50``.
        smooth: moving-average window of the loss curves, in logged points (1: none); None
            takes a tenth of the points, at most 20, so that a short run is not flattened.
        title: figure title; default the metrics file's path.

    Returns:
        ``{key: (iterations, values)}`` of every plotted curve (raw values).

    Raises:
        ValueError: a requested loss key is not in the file, or none of the loss and AP keys is.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = load_metrics(metrics_path)
    available = _available(records)
    requested = list(DEFAULT_LOSS_KEYS if loss_keys is None else loss_keys)
    if loss_keys is not None:
        missing = [k for k in requested if k not in available]
        if missing:
            raise ValueError(
                f"{metrics_path} has no {', '.join(missing)}; its keys: {', '.join(available)}"
            )
    losses = {k: _series(records, k) for k in requested if k in available}
    aps = {k: _series(records, k) for k in ap_keys if k in available}
    losses = {k: s for k, s in losses.items() if len(s[0])}
    aps = {k: s for k, s in aps.items() if len(s[0])}
    if not losses and not aps:
        wanted = ", ".join([*requested, *ap_keys])
        raise ValueError(
            f"{metrics_path} has none of the keys to plot ({wanted}); "
            f"its keys: {', '.join(available) or 'none'}"
        )

    if smooth is None:
        smooth = default_window(max((len(s[0]) for s in losses.values()), default=0))
    figure, (loss_axes, ap_axes) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for key, (iterations, values) in losses.items():
        (line,) = loss_axes.plot(iterations, moving_average(values, smooth), label=key)
        if smooth > 1:
            loss_axes.plot(iterations, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
    loss_axes.set_ylabel("loss" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    for key, (iterations, values) in aps.items():
        ap_axes.plot(iterations, values, marker="o", markersize=3, label=key)
    ap_axes.set_ylabel("AP (%)")
    ap_axes.set_xlabel("iteration")
    for axes, curves, what in ((loss_axes, losses, "loss"), (ap_axes, aps, "AP")):
        axes.grid(True, alpha=0.3)
        if curves:
            axes.legend(loc="best")
        else:
            axes.text(
                0.5, 0.5, f"no {what} values", ha="center", va="center", transform=axes.transAxes
            )
    figure.suptitle(title if title is not None else metrics_path)
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return {**losses, **aps}


def _key_list(text: str) -> List[str]:
    return [k for part in text.split(",") for k in [part.strip()] if k]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("metrics", help="a Detectron2 metrics.json")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument(
        "--keys",
        default="",
        help="comma-separated loss keys to plot beside total_loss, e.g. loss_class,loss_bbox",
    )
    parser.add_argument(
        "--ap-keys",
        default=",".join(DEFAULT_AP_KEYS),
        help="comma-separated evaluation keys (default: %(default)s)",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=None,
        help="moving-average window of the losses, in logged points (1: none; default: a tenth "
        "of the points, at most 20)",
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    extra = [k for k in _key_list(args.keys) if k != "total_loss"]
    try:
        records = load_metrics(args.metrics)
        # total_loss when logged, and every --keys key, which must be.
        loss_keys = None
        if extra:
            loss_keys = [k for k in DEFAULT_LOSS_KEYS if k in _available(records)] + extra
        curves = plot_metrics(
            args.metrics,
            args.output,
            loss_keys=loss_keys,
            ap_keys=_key_list(args.ap_keys),
            smooth=args.smooth,
            title=args.title,
        )
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output}: {', '.join(curves)}")
    return 0
