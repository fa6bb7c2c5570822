#!/usr/bin/env python
"""Check end to end that a converted Mask DINO checkpoint of the authors gives the authors' outputs.

    python tools/verify_maskdino_conversion.py --authors-repo /path/to/IDEA-Research/MaskDINO
    python tools/verify_maskdino_conversion.py --authors-repo /path/to/IDEA-Research/MaskDINO \\
        --checkpoint maskdino_r50_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask46.3ap_box51.7ap.pth

The authors' Mask DINO is built from their checkout (``maskdino.add_maskdino_config`` and
Detectron2's ``build_model`` on ``--authors-config``) on the CPU. Their compiled deformable
attention is not built: a stand-in ``MultiScaleDeformableAttention`` module makes their
``MSDeformAttn`` fall back to their own pure-PyTorch ``ms_deform_attn_core_pytorch``; their
inference path has no ``.cuda()`` call (those are in the training-only denoising and loss), so
nothing else is patched. Without ``--checkpoint`` the model gets seeded random weights (every
parameter perturbed) and is saved in the authors' file layout; with it, the file's weights are
loaded into their model strictly.

The file is converted with ``dino_d2.checkpoint.convert_checkpoint(source="maskdino")``; the
dino_d2 model is built from the config and overrides the conversion suggests and loaded strictly.
Both run in eval mode on the same random image (its sides multiples of 32: the authors' decoder
treats every pixel of the padded batch as valid, dino_d2 masks the padding, so only an unpadded
image is comparable), and the script compares, for every query of the last decoder layer,
within ``--tolerance``: the class logits, the boxes (normalized cxcywh) and the mask logits (at
the mask features' stride). Prints the largest differences and PASS or FAIL; exit code 1 on FAIL.

Both code bases register a meta-architecture named ``MaskDINO`` with Detectron2; the authors'
entry is removed from the registry after their model is built, so that dino_d2's can register.
"""

import argparse
import os
import sys
import tempfile
import types
from typing import Dict

import torch

from dino_d2.checkpoint import add_unsafe_load_argument, convert_checkpoint, load_checkpoint_file

DEFAULT_CONFIG = "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", required=True, help="checkout of IDEA-Research/MaskDINO")
    parser.add_argument(
        "--authors-config", default=DEFAULT_CONFIG, help="their yaml, relative to the repo"
    )
    parser.add_argument("--checkpoint", help="their released .pth (default: random weights)")
    parser.add_argument("--height", type=int, default=256, help="image height (multiple of 32)")
    parser.add_argument("--width", type=int, default=320, help="image width (multiple of 32)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference")
    parser.add_argument("--seed", type=int, default=0)
    add_unsafe_load_argument(parser, "--checkpoint")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 32:
            parser.error(f"--{name} must be a positive multiple of 32 (see the module docstring)")
    return args


def build_authors_model(repo: str, config: str):
    """The authors' model in eval mode, on the CPU, from their checkout."""
    if not os.path.isdir(os.path.join(repo, "maskdino")):
        raise SystemExit(f"{repo} is not a MaskDINO checkout (no maskdino/ folder)")
    sys.path.insert(0, os.path.abspath(repo))
    # Their ms_deform_attn_func imports the compiled op; the stand-in has no function, so their
    # MSDeformAttn takes its pure-PyTorch path.
    sys.modules.setdefault(
        "MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention")
    )
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from maskdino import add_maskdino_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskdino_config(cfg)
    cfg.merge_from_file(os.path.join(repo, config))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every floating-point parameter and buffer off its initialization (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.dtype.is_floating_point and not name.endswith("running_var"):
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))


def authors_outputs(model, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Their last decoder layer's ``pred_logits``, ``pred_boxes`` and ``pred_masks``."""
    from detectron2.structures import ImageList

    normalized = (image - model.pixel_mean) / model.pixel_std
    batch = ImageList.from_tensors([normalized], model.size_divisibility)
    outputs, _ = model.sem_seg_head(model.backbone(batch.tensor))
    return {
        "class logits": outputs["pred_logits"],
        "boxes": outputs["pred_boxes"],
        "mask logits": outputs["pred_masks"],
    }


def dino_d2_outputs(model, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The same three of the dino_d2 model's last decoder layer, read as its heads finish."""
    captured = {}
    run_heads = model.run_heads

    def keep(outputs):
        run_heads(outputs)
        captured["outputs"] = outputs

    model.run_heads = keep
    try:
        sizes = torch.tensor([list(image.shape[-2:])])
        model.detect(image[None], sizes, exact_batched=False)
    finally:
        del model.run_heads
    outputs = captured["outputs"]
    return {
        "class logits": outputs.pred_logits[-1],
        "boxes": outputs.pred_boxes[-1],
        "mask logits": outputs.extras["mask_logits"][-1],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    theirs = build_authors_model(args.authors_repo, args.authors_config)
    if args.checkpoint:
        checkpoint = load_checkpoint_file(args.checkpoint, unsafe=args.unsafe_load)
        theirs.load_state_dict(checkpoint["model"])
    else:
        perturb(theirs, args.seed)
    from detectron2.modeling import META_ARCH_REGISTRY

    META_ARCH_REGISTRY._obj_map.pop("MaskDINO", None)

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "authors.pth")
        torch.save({"model": theirs.state_dict(), "iteration": 0}, path)
        result = convert_checkpoint("maskdino", load_checkpoint_file(path))
    for note in result.notes:
        print(f"note: {note}")
    print(f"config: {result.config}; {result.overrides_line()}")
    ours = result.build_model().eval()
    ours.load_state_dict(result.state_dict, strict=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    image = torch.randint(0, 256, (3, args.height, args.width), generator=generator).float()
    with torch.no_grad():
        expected, got = authors_outputs(theirs, image), dino_d2_outputs(ours, image)
    passed = True
    for name, reference in expected.items():
        if got[name].shape != reference.shape:
            print(f"{name}: shape {tuple(got[name].shape)}, the authors' {tuple(reference.shape)}")
            passed = False
            continue
        difference = (got[name] - reference).abs().max().item()
        passed = passed and difference <= args.tolerance
        print(f"{name} {tuple(reference.shape)}: max |difference| {difference:.3g}")
    print("PASS" if passed else f"FAIL (tolerance {args.tolerance:g})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
