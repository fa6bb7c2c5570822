"""Convert DINO checkpoints of other code bases, and backbone weights, to dino_d2.

The entry point is :func:`convert_checkpoint`: it reads the source model's architecture from the
checkpoint, picks (or takes) a dino_d2 config, derives the config overrides that rebuild the
source model, instantiates that model and fills every one of its keys from the checkpoint. Every
tensor of the checkpoint must land somewhere (or be a known leftover such as a batch-norm counter)
and every model key must be filled, so a converted detector loads with ``strict=True``.
:func:`save_checkpoint` writes the result atomically, after checking that the file loads into a
model built from the config and the printed overrides and gives back exactly the converted tensors.

Sources (``SOURCES``):

* ``idea``: the authors' (IDEA-Research/DINO) ``checkpoint*.pth``;
* ``detrex``: detrex's DINO (``projects/dino``);
* ``easycv``: Alibaba EasyCV's DINO (the authors' head under ``head.``, an mmcv ResNet);
* ``maskdino``: the authors' Mask DINO (IDEA-Research/MaskDINO), into the Mask DINO project's
  model (:mod:`dino_d2.checkpoint.mask_dino` says what it maps and what it refuses);
* ``torchvision-resnet``: an ImageNet ResNet from torchvision, as a backbone initialization;
* ``swin``: Microsoft's Swin Transformer release, as a backbone initialization.
"""

import inspect
import os
import pickle
import shlex
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .architecture import Architecture, infer_swin_architecture
from .checkpointer import AtomicCheckpointer
from .dino import DETECTOR_LAYOUTS as _DINO_LAYOUTS
from .loading import load_checkpoint_file
from .mapping import ConversionError, format_keys, map_state_dict
from .mask_dino import MaskDINOLayout
from .resnet import infer_resnet_depth, is_resnet_extra, resnet_rules
from .swin import convert_swin_checkpoint

__all__ = [
    "SOURCES",
    "ConversionResult",
    "convert_checkpoint",
    "detect_source",
    "load_config",
    "save_checkpoint",
]

SOURCES = ("idea", "detrex", "easycv", "maskdino", "torchvision-resnet", "swin")
DETECTOR_LAYOUTS = {**_DINO_LAYOUTS, "maskdino": MaskDINOLayout()}
BACKBONE_SOURCES = ("torchvision-resnet", "swin")
_BACKBONE = "backbone.bottom_up."
_UNSET = object()

_BACKBONE_DESCRIPTIONS = {
    "torchvision-resnet": "torchvision-resnet: a torchvision ResNet state dict ('conv1.weight', "
    "'layer1.0.conv1.weight', ...), bare or under 'model' / 'state_dict'",
    "swin": "swin: Microsoft's Swin release ('patch_embed.proj.weight', 'layers.0.blocks.0.*', "
    "...), bare or under 'model'",
}


@dataclass
class ConversionResult:
    """A converted checkpoint and how to build the model it belongs to.

    Attributes:
        source: the source layout.
        state_dict: dino_d2 key -> tensor. For a detector every key of the model; for a
            backbone source the keys of ``backbone.bottom_up``.
        config: the dino_d2 config (shipped name or file path) the overrides apply to.
        overrides: ``key=value`` strings (Detectron2 LazyConfig / hydra syntax) that make
            ``config`` build the source model.
        architecture: what was read from the checkpoint.
        initialized: keys not in the checkpoint, filled with the model's initialization (the
            per-stage LayerNorms of a Swin ImageNet checkpoint).
        notes: assumptions and remarks for the user.
    """

    source: str
    state_dict: Dict[str, torch.Tensor]
    config: str
    overrides: List[str]
    architecture: Architecture
    initialized: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def backbone_only(self) -> bool:
        return self.source in BACKBONE_SOURCES

    def overrides_line(self) -> str:
        """``config overrides: k=v ...``, shell-quoted where needed."""
        return " ".join(["config overrides:"] + [shlex.quote(o) for o in self.overrides])

    def build_model(self) -> nn.Module:
        """Instantiates ``config`` with ``overrides`` (a fresh, randomly initialized model)."""
        from detectron2.config import LazyConfig, instantiate

        cfg = load_config(self.config)
        LazyConfig.apply_overrides(cfg, self.overrides)
        return instantiate(cfg.model)

    def checkpoint(self) -> Dict[str, Any]:
        """The Detectron2 checkpoint: ``{"model", "__author__", "matching_heuristics": False}``."""
        return {
            "model": self.state_dict,
            "__author__": f"dino_d2 convert_checkpoint --source {self.source}",
            "matching_heuristics": False,
        }


def load_config(config: str):
    """A LazyConfig from a file path (a yaml read as data only), or a shipped config by name
    (``dino_r50_4scale_12ep.py``)."""
    from dino_d2.model_zoo import get_config, load_config_file

    if os.path.isfile(config):
        return load_config_file(config)
    return get_config(config)


def _backbone_state_dict(source: str, checkpoint: Any) -> Optional[Dict[str, torch.Tensor]]:
    if not isinstance(checkpoint, Mapping):
        return None
    for container in ("model", "state_dict"):
        if isinstance(checkpoint.get(container), Mapping):
            checkpoint = checkpoint[container]
            break
    markers = {
        "torchvision-resnet": ("conv1.weight", "layer1.0.conv1.weight"),
        "swin": ("patch_embed.proj.weight",),
    }[source]
    return dict(checkpoint) if all(m in checkpoint for m in markers) else None


def _extract(source: str, checkpoint: Any, use_ema: bool):
    """``(state_dict, args)`` in the source's layout, or None when the file is not in it."""
    if source in BACKBONE_SOURCES:
        state_dict = _backbone_state_dict(source, checkpoint)
        return None if state_dict is None else (state_dict, None)
    return DETECTOR_LAYOUTS[source].extract(checkpoint, use_ema)


def detect_source(checkpoint: Any) -> Optional[str]:
    """The first source whose layout the loaded checkpoint is in, or None."""
    for source in SOURCES:
        if _extract(source, checkpoint, use_ema=False) is not None:
            return source
    return None


def _unknown_layout(source: str, checkpoint: Any) -> ConversionError:
    if isinstance(checkpoint, Mapping):
        seen = f"top-level keys {format_keys(sorted(map(str, checkpoint)))}"
    else:
        seen = f"a {type(checkpoint).__name__}, not a dict"
    guess = detect_source(checkpoint)
    hint = f"; it looks like the {guess!r} layout (--source {guess})" if guess else ""
    known = [layout.describe() for layout in DETECTOR_LAYOUTS.values()]
    known += list(_BACKBONE_DESCRIPTIONS.values())
    return ConversionError(
        f"the checkpoint is not in the {source!r} layout: the file has {seen}{hint}. "
        "Known layouts: " + "; ".join(known)
    )


def _config_value(cfg, key: str) -> Any:
    """The (resolved) value of ``key`` in ``cfg``; the callable's default when the config omits
    it; ``_UNSET`` when neither is known."""
    from omegaconf import OmegaConf

    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None)
    if parent is None or not OmegaConf.is_config(parent):
        raise ConversionError(f"the config has no {parent_key!r}, which {key!r} needs")
    if name in parent:
        value = parent[name]
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    target = parent.get("_target_")
    try:
        parameter = inspect.signature(target).parameters.get(name) if target else None
    except (TypeError, ValueError):
        parameter = None
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return parameter.default
    return _UNSET


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _config_backbone(cfg) -> str:
    from omegaconf import OmegaConf

    from dino_d2.modeling.backbone.swin import SwinBackbone

    bottom_up = OmegaConf.select(cfg, "model.backbone.bottom_up", default=None)
    if bottom_up is None:
        return "unknown"
    if "stages" in bottom_up:
        return "resnet"
    return "swin" if bottom_up.get("_target_") is SwinBackbone else "unknown"


def _plan(arch: Architecture, config: Optional[str]) -> Tuple[Any, str, List[str]]:
    """``(cfg with overrides applied, config name, overrides)`` for the architecture."""
    from detectron2.config import LazyConfig

    name = config or arch.default_config()
    cfg = load_config(name)
    kind = _config_backbone(cfg)
    if kind != arch.backbone:
        raise ConversionError(
            f"the checkpoint has a {arch.backbone} backbone but the config {name!r} builds a "
            f"{kind} one; choose a config with a {arch.backbone} backbone"
        )
    heads = tuple(
        _config_value(cfg, f"model.transformer.{p}.layer.num_heads") for p in ("encoder", "decoder")
    )
    if arch.detector is not None and arch.num_heads is None and _UNSET in heads:
        raise ConversionError(f"the config {name!r} sets no attention heads for the transformer")
    overrides = []
    for key, value in arch.config_values(heads).items():
        current = _config_value(cfg, key)
        if current is _UNSET or not _same(current, value):
            overrides.append(f"{key}={_format(value)}")
    LazyConfig.apply_overrides(cfg, overrides)
    return cfg, name, overrides


def _swin_backbone(
    state_dict: Mapping[str, torch.Tensor], backbone: nn.Module, layout: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``(converted, missing)``: Swin weights for ``backbone`` under ``backbone.bottom_up.``."""
    try:
        converted, missing = convert_swin_checkpoint(state_dict, backbone)
    except ValueError as error:
        raise ConversionError(f"{layout} layout, Swin backbone: {error}") from None
    expected = backbone.state_dict()
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"shape mismatch: the Swin weights give {_BACKBONE + key!r} the shape "
                f"{tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    return {_BACKBONE + k: v for k, v in converted.items()}, [_BACKBONE + k for k in missing]


def _leftovers(state_dict, consumed, ignored, layout: str, config: str) -> None:
    unused = [k for k in state_dict if k not in consumed and not ignored(k)]
    if unused:
        raise ConversionError(
            f"{len(unused)} tensors of the {layout!r} checkpoint have no place in the model of "
            f"{config} with the derived overrides: {format_keys(unused)}"
        )


def _convert_detector(source, checkpoint, config, num_classes, use_ema, model):
    from detectron2.config import instantiate

    layout = DETECTOR_LAYOUTS[source]
    extracted = _extract(source, checkpoint, use_ema)
    if extracted is None:
        raise _unknown_layout(source, checkpoint)
    state_dict, args = extracted
    arch = layout.inspect(state_dict, args, num_classes)
    cfg, name, overrides = _plan(arch, config)
    model = model if model is not None else instantiate(cfg.model)
    target = {k: v.shape for k, v in model.state_dict().items()}
    converted: Dict[str, torch.Tensor] = {}
    consumed = set()
    if arch.backbone == "swin":
        prefix = layout.swin_prefix
        swin = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        converted, missing = _swin_backbone(swin, model.backbone.bottom_up, source)
        if missing:
            raise ConversionError(
                f"the checkpoint's Swin backbone lacks {format_keys(missing)} for the config's "
                "out_features"
            )
        consumed.update(prefix + k for k in swin)
        target = {k: s for k, s in target.items() if not k.startswith(_BACKBONE)}
    mapped, used = map_state_dict(target, state_dict, layout.rules(arch), source)
    converted.update(mapped)
    consumed |= used
    _leftovers(state_dict, consumed, layout.is_ignored, source, name)
    return ConversionResult(source, converted, name, overrides, arch, notes=list(arch.notes))


def _convert_backbone(source, checkpoint, config, model):
    from detectron2.config import instantiate

    extracted = _extract(source, checkpoint, use_ema=False)
    if extracted is None:
        raise _unknown_layout(source, checkpoint)
    state_dict, _ = extracted
    if source == "swin":
        arch = Architecture("swin", infer_swin_architecture(state_dict, ""))
    else:
        arch = Architecture(
            "resnet", {"stages.depth": infer_resnet_depth(state_dict, "", "torchvision")}
        )
    cfg, name, overrides = _plan(arch, config)
    model = model if model is not None else instantiate(cfg.model)
    backbone = model.backbone.bottom_up
    initialized: List[str] = []
    if source == "swin":
        converted, initialized = _swin_backbone(state_dict, backbone, source)
        defaults = backbone.state_dict()
        for key in initialized:
            converted[key] = defaults[key[len(_BACKBONE) :]].clone()
    else:
        target = {_BACKBONE + k: v.shape for k, v in backbone.state_dict().items()}
        rules = resnet_rules("", _BACKBONE, "torchvision")
        converted, consumed = map_state_dict(target, state_dict, rules, source)
        _leftovers(state_dict, consumed, is_resnet_extra, source, name)
    notes = [f"initialized from the model (not in the checkpoint): {format_keys(initialized)}"]
    return ConversionResult(
        source,
        converted,
        name,
        overrides,
        arch,
        initialized=initialized,
        notes=notes if initialized else [],
    )


def convert_checkpoint(
    source: str,
    checkpoint: Any,
    *,
    config: Optional[str] = None,
    num_classes: Optional[int] = None,
    use_ema: bool = False,
    model: Optional[nn.Module] = None,
) -> ConversionResult:
    """Converts a loaded checkpoint of ``source`` to dino_d2.

    Args:
        source: one of :data:`SOURCES`.
        checkpoint: the loaded file (e.g. from :func:`load_checkpoint_file`).
        config: dino_d2 config to express the model in (shipped name or path); by default the
            shipped config closest to the checkpoint's architecture.
        num_classes: keep class rows ``0..num_classes-1``. By default the authors' 91-row COCO
            heads are remapped to the 80 COCO classes, other heads are kept whole.
        use_ema: convert the authors' ``ema_model`` instead of ``model``.
        model: the model ``config`` + overrides builds, if already built (skips instantiation).

    Returns:
        A :class:`ConversionResult`.

    Raises:
        ConversionError: unknown layout, missing tensor, shape mismatch, unused tensors or an
            architecture dino_d2 cannot express; the message says which.
    """
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if source in BACKBONE_SOURCES:
        if num_classes is not None or use_ema:
            raise ConversionError(f"--num-classes and --use-ema do not apply to {source!r}")
        return _convert_backbone(source, checkpoint, config, model)
    return _convert_detector(source, checkpoint, config, num_classes, use_ema, model)


def _write(result: ConversionResult, path: str) -> None:
    data = result.checkpoint()
    if path.endswith(".pkl"):
        # Detectron2's own format for .pkl: numpy arrays, read without matching heuristics.
        data["model"] = {k: v.numpy() for k, v in data["model"].items()}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)


def _read_back(path: str) -> Dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in load_checkpoint_file(path)["model"].items()}


def _verify(result: ConversionResult, path: str, model: nn.Module) -> None:
    """Loads ``path`` strictly into ``model`` and checks every tensor comes back unchanged."""
    loaded = _read_back(path)
    module, prefix = (model.backbone.bottom_up, _BACKBONE) if result.backbone_only else (model, "")
    try:
        module.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items()}, strict=True)
    except RuntimeError as error:
        raise ConversionError(
            f"the converted weights do not load strictly into {result.config} with "
            f"{result.overrides}: {error}"
        ) from None
    if not result.backbone_only:
        # Detectron2's own reader, as train.init_checkpoint uses it (a backbone-only file would
        # only make it log the detector's keys as missing).
        AtomicCheckpointer(model).load(path)
    current = model.state_dict()
    changed = [k for k, v in result.state_dict.items() if not torch.equal(current[k], v)]
    if changed:
        raise ConversionError(
            f"after loading, {format_keys(changed)} differ from the converted tensors (tensors "
            "that the config shares between layers got different values)"
        )


def save_checkpoint(
    result: ConversionResult, path: str, *, model: Optional[nn.Module] = None
) -> None:
    """Writes ``result`` as a Detectron2 checkpoint, verified, atomically.

    The file goes to a temporary name in the same folder, is loaded strictly into ``model`` (by
    default built from ``result.config`` and ``result.overrides``) and through
    :class:`AtomicCheckpointer` (Detectron2's reader), and is renamed to ``path`` only when every tensor comes back
    unchanged; on any failure nothing is left behind. ``.pkl`` paths get Detectron2's pickle
    format (numpy arrays), others ``torch.save``.

    Raises:
        ConversionError: when the verification fails.
    """
    model = model if model is not None else result.build_model()
    folder = os.path.dirname(os.path.abspath(path))
    suffix = ".pkl" if path.endswith(".pkl") else ".pth"
    handle, temporary = tempfile.mkstemp(prefix=".convert-", suffix=suffix, dir=folder)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        _write(result, temporary)
        _verify(result, temporary, model)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
