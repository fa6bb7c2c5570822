#!/usr/bin/env python
"""Check end to end that a converted checkpoint of the DINO authors gives the authors' outputs.

    python tools/verify_conversion.py --authors-repo /path/to/IDEA-Research/DINO --variant r50_4scale
    python tools/verify_conversion.py --authors-repo /path/to/IDEA-Research/DINO \\
        --variant r50_4scale --checkpoint checkpoint0011_4scale.pth

The authors' DINO is built from their checkout (``models/dino/dino.py`` ``build_dino``, with the
values of ``config/DINO/DINO_4scale.py`` / ``DINO_5scale.py`` / ``DINO_4scale_swin.py``) on the
CPU: no backbone weights are downloaded and their deformable attention runs as their own
pure-PyTorch ``ms_deform_attn_core_pytorch`` instead of their CUDA op. Without ``--checkpoint``
the model gets seeded random weights (every parameter perturbed, FrozenBN statistics random) and
is saved in the authors' file layout; with it, the file's weights are loaded.

The file is converted with ``dino_d2.checkpoint.convert_checkpoint(source="idea")``; the dino_d2
model is built from the config and overrides the conversion suggests and loaded strictly. Both
models then run in eval mode on the same random images, one at a time (no padding), and the
script compares, within ``--tolerance``:

* the class logits and boxes of every query of the last decoder layer (the authors' 91 columns
  taken at the COCO category ids: dino_d2 class k is the authors' column ``COCO_ID[k]``);
* the encoder's selected proposals (their logits and refined boxes). Query i pairs the i-th
  best proposal with the i-th learned content embedding, so two proposals whose scores tie to a
  rounding error can legitimately come out of the top-k in the other order and change those
  queries; such a swap is reported and dino_d2 re-run with the authors' order of those proposals
  (a hook on its query selection), so every query can then be compared. Likewise, the last kept
  proposal can tie one left out, so that the two top-k hold different ones: that is reported and
  the authors' proposal put in its place;
* dino_d2's detections (``Instances``) against the authors' ``PostProcess`` top-300 with labels
  mapped to contiguous classes and boxes clipped to the image, empty ones dropped, as
  Detectron2's ``detector_postprocess`` does. Detections are paired by class and score, so two
  near-equal scores that come out in the other order do not count as a difference.

With ``--fast-path both`` (the default) every check runs twice: on the model as built and on
its CPU fast-path copy (:func:`dino_d2.layers.fast_path.optimized_copy`: folded batch norms,
channels-last backbone, oneDNN linears), each against the authors' outputs; ``on`` or ``off``
runs one of them.

Prints the largest differences and PASS or FAIL; the exit code is 1 on FAIL.
"""

import argparse
import importlib
import importlib.util
import math
import os
import sys
import tempfile
import time
import types
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

VARIANTS = {
    "r50_4scale": ("DINO_4scale.py", {}),
    "r50_5scale": ("DINO_5scale.py", {}),
    "swin_t_4scale": ("DINO_4scale_swin.py", {"backbone": "swin_T_224_1k"}),
}
# Arguments of the authors' main.py that build_dino reads, set for this check: the CPU, and no
# gradient checkpointing in the Swin backbone (it changes memory, not the numbers).
RUN_ARGS = {"dataset_file": "coco", "device": "cpu", "use_checkpoint": False}
# Bias given, in the random model, to the rows of the authors' 91-row class heads that are not
# COCO categories. The converter drops those rows; a trained model never ranks them first (they
# only ever see negative targets), but random ones could win the authors' query selection, a
# max over all 91 columns, and select a proposal dino_d2 cannot.
UNUSED_CLASS_BIAS = -100.0


def parse_args(argv=None):
    from dino_d2.checkpoint import add_unsafe_load_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--authors-repo", required=True, help="checkout of IDEA-Research/DINO (read, imported)"
    )
    parser.add_argument(
        "--checkpoint",
        help="the authors' checkpoint*.pth to verify (default: a random model of --variant)",
    )
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="r50_4scale",
        help="the authors' config to build (with --checkpoint, the args saved in the file win)",
    )
    parser.add_argument("--height", type=int, default=320, help="height of the first image")
    parser.add_argument("--width", type=int, default=480, help="width of the first image")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fast-path",
        choices=["both", "off", "on"],
        default="both",
        help="check the model as built (off), its CPU fast-path copy (on), or each in turn",
    )
    add_unsafe_load_argument(parser, "--checkpoint")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The authors' code


class _PytorchDeformAttnFunction:
    """Stands in for the authors' ``MSDeformAttnFunction`` (their CUDA op) with the same call
    signature, computing their own reference ``ms_deform_attn_core_pytorch``."""

    def __init__(self, core):
        self.core = core

    def apply(self, value, shapes, level_start_index, locations, weights, im2col_step):
        return self.core(value, shapes, locations, weights)


def import_authors(repo: str) -> types.ModuleType:
    """Imports the authors' ``models.dino.dino`` from ``repo`` and patches it to run here.

    The compiled ``MultiScaleDeformableAttention`` module is replaced by an empty stand-in for
    the import when it is not installed, and every deformable attention is routed to the
    authors' pure-PyTorch function; ``is_main_process`` is made False in their backbone module,
    so torchvision builds the ResNet without downloading weights.
    """
    repo = os.path.abspath(repo)
    for name in ("models", "util"):
        loaded = sys.modules.get(name)
        if loaded is not None and not os.path.abspath(loaded.__file__).startswith(repo + os.sep):
            raise RuntimeError(f"a different {name!r} package is already imported: {loaded}")
    stub = importlib.util.find_spec("MultiScaleDeformableAttention") is None
    if stub:
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
            "MultiScaleDeformableAttention"
        )
    sys.path.insert(0, repo)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations of old timm / torch APIs they use
            dino = importlib.import_module("models.dino.dino")
            backbone = importlib.import_module("models.dino.backbone")
            attention = importlib.import_module("models.dino.ops.modules.ms_deform_attn")
            function = importlib.import_module("models.dino.ops.functions.ms_deform_attn_func")
    finally:
        sys.path.remove(repo)
        if stub:
            del sys.modules["MultiScaleDeformableAttention"]
    attention.MSDeformAttnFunction = _PytorchDeformAttnFunction(
        function.ms_deform_attn_core_pytorch
    )
    backbone.is_main_process = lambda: False
    return dino


def read_authors_config(path: str) -> Dict[str, Any]:
    """The values of one of the authors' ``config/DINO/*.py`` files, ``_base_`` files first."""
    namespace: Dict[str, Any] = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    values: Dict[str, Any] = {}
    for base in namespace.get("_base_", []):
        values.update(read_authors_config(os.path.join(os.path.dirname(path), base)))
    values.update(
        {
            k: v
            for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)
        }
    )
    return values


def authors_args(
    repo: str, variant: str, saved: Optional[Dict[str, Any]] = None
) -> argparse.Namespace:
    """The args for ``build_dino``: the variant's config, then ``saved`` (a checkpoint's own
    args), then :data:`RUN_ARGS`; without ``backbone_dir``, so no backbone weights are read."""
    config, deltas = VARIANTS[variant]
    values = read_authors_config(os.path.join(repo, "config", "DINO", config))
    values.update(deltas)
    values.update(saved or {})
    values.update(RUN_ARGS)
    values.pop("backbone_dir", None)
    return argparse.Namespace(**values)


def randomize_(model: torch.nn.Module, coco_ids: Sequence[int], seed: int) -> None:
    """Makes a freshly built authors' model a random one with nothing trivially zero.

    Every parameter gets N(0, 0.02) noise (the zero-initialized box heads, sampling offsets and
    attention weights included); the FrozenBatchNorm2d affine parameters and statistics become
    random positive scales, small shifts and variances in [0.5, 2]; the class heads' rows that are
    not COCO categories get :data:`UNUSED_CLASS_BIAS`.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if type(module).__name__ == "FrozenBatchNorm2d":
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        unused = sorted(set(range(model.num_classes)) - set(coco_ids))
        for head in (model.class_embed[0], model.transformer.enc_out_class_embed):
            head.bias[unused] = UNUSED_CLASS_BIAS


def build_authors_model(dino: types.ModuleType, args: argparse.Namespace):
    """``(model in eval mode, the 'bbox' PostProcess)`` built by the authors' ``build_dino``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=False
        model, _, postprocessors = dino.build_dino(args)
    return model.eval(), postprocessors["bbox"]


# ----------------------------------------------------------------------------------------------
# Running and comparing


def run_authors(model, postprocess, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The authors' outputs for one normalized (3, H, W) image: the last decoder layer, the
    selected encoder proposals and the post-processed top detections."""
    height, width = image.shape[-2:]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid without indexing=, in their code
        out = model([image])
        detections = postprocess(out, torch.tensor([[height, width]]))[0]
    return {
        "logits": out["pred_logits"][0],
        "boxes": out["pred_boxes"][0],
        "enc_logits": out["interm_outputs"]["pred_logits"][0],
        "enc_boxes": out["interm_outputs"]["pred_boxes"][0],
        "scores": detections["scores"],
        "labels": detections["labels"],
        "det_boxes": detections["boxes"],
    }


def run_ours(model, image: torch.Tensor, order=None, substitute=None) -> Dict[str, torch.Tensor]:
    """dino_d2's outputs for one 0-255 RGB (3, H, W) image, as :func:`run_authors` returns them.

    The transformer's output is read with a forward hook. ``order`` (k,) reorders the selected
    proposals and ``substitute``, ``(positions, enc_boxes, enc_logits)``, then puts other
    proposals at those positions (:func:`dino_d2.export.ties.forced_selection`).
    """
    from dino_d2.export.ties import forced_selection

    height, width = image.shape[-2:]
    captured = []
    handle = model.transformer.register_forward_hook(lambda m, i, out: captured.append(out))
    forced = None if order is None else order[None]
    try:
        with torch.no_grad(), forced_selection(model, forced, substitute):
            instances = model([{"image": image, "height": height, "width": width}])[0]["instances"]
    finally:
        handle.remove()
    (out,) = captured
    return {
        "logits": out.pred_logits[-1, 0],
        "boxes": out.pred_boxes[-1, 0],
        "enc_logits": out.enc_logits[0],
        "enc_boxes": out.enc_boxes[0],
        "scores": instances.scores,
        "labels": instances.pred_classes,
        "det_boxes": instances.pred_boxes.tensor,
    }


def detectron2_detections(theirs, coco_ids, height, width):
    """The authors' top detections with contiguous labels (-1 for a non-COCO column) and boxes
    clipped to the image, empty ones dropped: what ``detector_postprocess`` does to ours."""
    contiguous = torch.full((max(coco_ids) + 1,), -1, dtype=torch.long)
    contiguous[torch.tensor(coco_ids)] = torch.arange(len(coco_ids))
    labels = contiguous[theirs["labels"]]
    boxes = theirs["det_boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], theirs["scores"][keep], labels[keep]


def tie_break_order(ours, theirs, tolerance: float) -> Optional[torch.Tensor]:
    """The order that puts our selected proposals in the authors' order, or None if they agree
    (:func:`dino_d2.export.ties.selection_tie_order`).

    Returns:
        (k,) int64: position j of the reordered selection takes our proposal ``order[j]``.
    """
    from dino_d2.export.ties import selection_tie_order

    score = ours["enc_logits"].amax(1)
    return selection_tie_order(ours["enc_boxes"], score, theirs["enc_boxes"], tolerance)


def cut_substitutions(ours, theirs, coco_ids, tolerance):
    """Queries at the top-k cut that hold another proposal than the authors' at that index
    (:func:`dino_d2.export.ties.cut_ties`), with the authors' proposals (their refined boxes
    and logits, which ours match to within the same rounding) to put there, so that every other
    query can then be compared.

    Returns:
        ``(positions, enc_boxes, enc_logits)`` for :func:`run_ours`, or None.
    """
    from dino_d2.export.ties import cut_ties

    positions = cut_ties(
        ours["enc_boxes"],
        ours["enc_logits"].amax(1),
        theirs["enc_boxes"],
        theirs["enc_logits"].amax(1),
        tolerance,
    )
    if positions is None:
        return None
    return positions, theirs["enc_boxes"][positions], theirs["enc_logits"][:, coco_ids][positions]


def compare(ours, theirs, coco_ids, size, tolerance) -> Tuple[bool, List[str]]:
    """``(passed, report lines)`` for one image."""
    height, width = size
    lines, passed = [], True
    checks = [
        ("class logits, every query", ours["logits"], theirs["logits"][:, coco_ids]),
        ("boxes (cxcywh), every query", ours["boxes"], theirs["boxes"]),
        ("encoder proposals: logits", ours["enc_logits"], theirs["enc_logits"][:, coco_ids]),
        ("encoder proposals: boxes", ours["enc_boxes"], theirs["enc_boxes"]),
    ]
    for name, a, b in checks:
        if a.shape != b.shape:
            lines.append(f"  {name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}  FAIL")
            passed = False
            continue
        diff = float((a - b).abs().max())
        ok = diff <= tolerance
        passed &= ok
        lines.append(f"  {name:30s} max |diff| {diff:.2e}  {'ok' if ok else 'FAIL'}")

    from dino_d2.export.ties import pair_detections, unpaired_beyond_cut

    # Detections: scores in [0, 1] within the tolerance; boxes in pixels, within the tolerance
    # of normalized coordinates times the image size.
    box_tolerance = tolerance * max(height, width)
    mine = (ours["det_boxes"], ours["scores"], ours["labels"])
    reference = detectron2_detections(theirs, coco_ids, height, width)
    score_diffs, box_diffs, unpaired, their_unpaired = pair_detections(
        mine, reference, tolerance, box_tolerance
    )
    # A detection may be unpaired only at the top-k cut: its score ties the last kept one.
    cut = min(float(ours["scores"].min()), float(reference[1].min()))
    bad = unpaired_beyond_cut(unpaired + their_unpaired, cut, tolerance)
    ok = not bad and len(score_diffs) > 0
    passed &= ok
    lines.append(
        f"  {'detections':30s} {len(score_diffs)} paired of {len(mine[1])} / {len(reference[1])}"
        f" (authors' top-{len(theirs['scores'])} after clipping), scores max |diff| "
        f"{max(score_diffs, default=0.0):.2e}, boxes max |diff| {max(box_diffs, default=0.0):.2e}"
        f" px  {'ok' if ok else 'FAIL'}"
    )
    if unpaired or their_unpaired:
        lines.append(
            f"    unpaired (score, class): ours {unpaired[:5]}, authors' {their_unpaired[:5]}"
            + ("" if bad else " -- ties at the top-k cut")
        )
    return passed, lines


def random_images(height: int, width: int, seed: int) -> List[torch.Tensor]:
    """Two 0-255 RGB images, (height, width) and an odd size of another aspect ratio."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(height, width), (height * 3 // 4 + 5, width * 5 // 4 + 7)]
    return [torch.randint(0, 256, (3, h, w), generator=generator).float() for h, w in sizes]


# ----------------------------------------------------------------------------------------------


def prepare_authors(args, dino: types.ModuleType, coco_ids: Sequence[int], folder: str):
    """``(model, postprocess, checkpoint, description)``: the authors' model with the weights of
    ``--checkpoint``, or random ones that are also saved in their file layout under ``folder``;
    ``checkpoint`` is the file as :func:`dino_d2.checkpoint.load_checkpoint_file` reads it."""
    from dino_d2.checkpoint import load_checkpoint_file

    if args.checkpoint:
        checkpoint = load_checkpoint_file(args.checkpoint, unsafe=args.unsafe_load)
        saved = checkpoint.get("args")
        saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
        model_args = authors_args(args.authors_repo, args.variant, saved)
        model, postprocess = build_authors_model(dino, model_args)
        model.load_state_dict(checkpoint["model"], strict=True)
        weights = f"the weights of {args.checkpoint}"
    else:
        model_args = authors_args(args.authors_repo, args.variant)
        torch.manual_seed(args.seed)  # the authors' initialization uses the global generator
        model, postprocess = build_authors_model(dino, model_args)
        randomize_(model, coco_ids, args.seed)
        path = os.path.join(folder, f"authors_{args.variant}_random.pth")
        torch.save({"model": model.state_dict(), "args": model_args, "epoch": 0}, path)
        checkpoint = load_checkpoint_file(path)
        weights = f"random weights (seed {args.seed})"
    description = (
        f"{model_args.backbone}, {model_args.num_feature_levels} levels, "
        f"{model_args.num_queries} queries, {weights}"
    )
    return model, postprocess, checkpoint, description


def check_image_sizes(model, sizes, num_queries: int) -> None:
    """The authors' query selection needs at least ``num_queries`` encoder tokens."""
    strides = [shape.stride for shape in model.backbone.output_shape().values()]
    for h, w in sizes:
        tokens = sum(math.ceil(h / s) * math.ceil(w / s) for s in strides)
        if tokens < num_queries:
            raise SystemExit(
                f"error: a {h}x{w} image gives {tokens} encoder tokens, fewer than the "
                f"{num_queries} queries the authors' top-k selects; use a larger --height/--width"
            )


def verify_image(ours, authors, postprocess, image, coco_ids, tolerance) -> Tuple[bool, List[str]]:
    """Runs both models on one 0-255 RGB image and compares them; ``(passed, report lines)``."""
    # The authors' input is exactly what dino_d2 computes from the 0-255 image (their ToTensor +
    # Normalize gives the same values to within a rounding).
    normalized = (image - ours.pixel_mean) / ours.pixel_std
    tic = time.perf_counter()
    theirs = run_authors(authors, postprocess, normalized)
    tac = time.perf_counter()
    mine = run_ours(ours, image)
    toc = time.perf_counter()
    lines = [f"  run time: authors {tac - tic:.1f} s, dino_d2 {toc - tac:.1f} s"]
    order = tie_break_order(mine, theirs, tolerance)
    if order is not None:
        moved = (order != torch.arange(len(order))).nonzero()[:, 0]
        gap = max(
            float((scores[moved] - scores[order[moved]]).abs().max())
            for scores in (mine["enc_logits"].amax(1), theirs["enc_logits"][:, coco_ids].amax(1))
        )
        lines.append(
            f"  tie: queries {moved[:10].tolist()} select proposals whose encoder scores differ by "
            f"at most {gap:.1e}, in another order than the authors'; dino_d2 re-run in theirs"
        )
        mine = run_ours(ours, image, order)
    substitute = cut_substitutions(mine, theirs, coco_ids, tolerance)
    if substitute is not None:
        positions = substitute[0]
        lines.append(
            f"  tie at the top-{len(mine['enc_boxes'])} cut: queries {positions.tolist()} hold "
            "another proposal than the authors', both scoring within the tolerance of their last "
            "kept one; dino_d2 re-run with the authors' proposal there"
        )
        mine = run_ours(ours, image, order, substitute)
    passed, comparison = compare(mine, theirs, coco_ids, tuple(image.shape[-2:]), tolerance)
    return passed, lines + comparison


def variants_to_check(model, fast_path: str) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, model)`` pairs that ``--fast-path`` asks for: the model as built and/or its CPU
    fast-path copy (the model itself is left as it is)."""
    from dino_d2.layers.fast_path import OneDNNLinear, optimized_copy
    from dino_d2.layers.frozen_bn import FrozenBNConv2d

    variants = [] if fast_path == "on" else [("model as built", model)]
    if fast_path != "off":
        fast = optimized_copy(model)
        folded = sum(isinstance(m, FrozenBNConv2d) for m in fast.modules())
        linears = sum(isinstance(m, OneDNNLinear) for m in fast.modules())
        name = f"fast path ({folded} batch norms folded, {linears} oneDNN linears)"
        variants.append((name, fast))
    return variants


def main(argv=None) -> int:
    args = parse_args(argv)
    from dino_d2.checkpoint import ConversionError, UntrustedFileError, convert_checkpoint
    from dino_d2.checkpoint.classes import coco_category_ids

    start = time.perf_counter()
    coco_ids = coco_category_ids()
    dino = import_authors(args.authors_repo)
    with tempfile.TemporaryDirectory() as folder:
        try:
            authors, postprocess, checkpoint, description = prepare_authors(
                args, dino, coco_ids, folder
            )
        except UntrustedFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"authors' model: {description}")
        try:
            result = convert_checkpoint("idea", checkpoint)
        except ConversionError as error:
            print(f"error: the conversion failed: {error}", file=sys.stderr)
            return 1
        del checkpoint
    for note in result.notes:
        print(f"note: {note}")
    print(f"config: {result.config}")
    print(result.overrides_line())
    ours = result.build_model()
    ours.load_state_dict(result.state_dict, strict=True)
    ours.eval()
    images = random_images(args.height, args.width, args.seed)
    check_image_sizes(ours, [image.shape[-2:] for image in images], authors.num_queries)
    models = variants_to_check(ours, args.fast_path)
    built = time.perf_counter()

    passed = True
    for name, model in models:
        for index, image in enumerate(images):
            ok, lines = verify_image(model, authors, postprocess, image, coco_ids, args.tolerance)
            passed &= ok
            print(f"{name}, image {index} ({image.shape[1]}x{image.shape[2]}):")
            print("\n".join(lines))
    total = time.perf_counter() - start
    print(
        f"{args.variant}: {'PASS' if passed else 'FAIL'} (tolerance {args.tolerance:g}); "
        f"{total:.1f} s in total, {built - start:.1f} s to build and convert"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
