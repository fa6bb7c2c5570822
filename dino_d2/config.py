"""yacs support: build DINO from a classic Detectron2 config (``MODEL.META_ARCHITECTURE: "DINO"``).

LazyConfigs under ``configs/`` are the primary way to configure dino_d2 and the only place its
defaults are written. This module derives the yacs defaults from them, so that code built around
``get_cfg()`` / ``build_model(cfg)`` can use DINO too::

    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.MODEL.DINO.num_classes = 20
    cfg.MODEL.DINO.transformer.encoder.num_layers = 3
    model = build_model(cfg)

``MODEL.DINO`` mirrors ``model`` of ``configs/common/models/dino_r50.py`` (same lower-case keys,
nested), without its ``_target_`` entries, its backbone (``MODEL.BACKBONE`` / ``MODEL.RESNETS``
build it, the neck takes every feature the backbone outputs) and the values that the LazyConfig
derives from others (``${...}`` interpolations follow the values they point to). The ResNet and
input keys of the yacs config are set from the LazyConfig's backbone and model.
"""

import inspect
from typing import Any, Dict

from omegaconf import DictConfig, ListConfig, OmegaConf

from detectron2.config import CfgNode as CN
from detectron2.config import instantiate
from detectron2.modeling import build_backbone

from .model_zoo import get_config

__all__ = ["DEFAULTS_CONFIG", "add_dino_config", "dino_kwargs_from_yacs"]

# The LazyConfig that holds DINO's defaults (R50 4-scale, the authors' recipe).
DEFAULTS_CONFIG = "common/models/dino_r50.py"


def _lazy_model() -> DictConfig:
    return get_config(DEFAULTS_CONFIG).model


def _plain_values(node) -> Dict[str, Any]:
    """The nested plain values of a LazyConfig node: no ``_target_``, no interpolations."""
    values = {}
    for key in node:
        if key == "_target_" or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            values[key] = _plain_values(value)
        elif isinstance(value, ListConfig):
            values[key] = OmegaConf.to_container(value)
        else:
            values[key] = value
    return values


def add_dino_config(cfg: CN) -> None:
    """Adds ``MODEL.DINO`` (and ``MODEL.SWIN``) with the LazyConfig's R50 4-scale defaults."""
    from dino_d2.modeling.backbone.swin_config import add_swin_config

    add_swin_config(cfg)
    model = _lazy_model()
    values = _plain_values(model)
    del values["backbone"]["bottom_up"]
    cfg.MODEL.DINO = CN(values)
    # Terms are open sets: a YAML file may name a registered loss or cost that is not a default.
    cfg.MODEL.DINO.criterion.losses.set_new_allowed(True)
    cfg.MODEL.DINO.criterion.matcher.costs.set_new_allowed(True)
    bottom_up = model.backbone.bottom_up
    cfg.MODEL.RESNETS.DEPTH = bottom_up.stages.depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = bottom_up.stages.stride_in_1x1
    cfg.MODEL.RESNETS.NORM = bottom_up.stages.norm
    cfg.MODEL.RESNETS.OUT_FEATURES = list(bottom_up.out_features)
    cfg.MODEL.BACKBONE.FREEZE_AT = bottom_up.freeze_at
    cfg.MODEL.PIXEL_MEAN = list(model.pixel_mean)
    cfg.MODEL.PIXEL_STD = list(model.pixel_std)
    cfg.INPUT.FORMAT = model.input_format


# MODEL.DINO nodes whose keys are names of registered terms rather than fixed settings.
_OPEN_NODES = ("criterion.losses", "criterion.matcher.costs")


def _accepts(parent: DictConfig, key: str) -> bool:
    """Whether ``key`` is an argument of the LazyCall ``parent`` (one the config leaves at its
    default), or ``parent`` is an open set of term names."""
    target = parent.get("_target_") if isinstance(parent, DictConfig) else None
    if target is None:
        return False
    parameters = inspect.signature(target).parameters
    return key in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _update(node: DictConfig, values: Dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        path = prefix + key
        parent = OmegaConf.select(node, prefix[:-1]) if prefix else node
        known = key in parent or prefix[:-1] in _OPEN_NODES or _accepts(parent, key)
        if not known:
            raise KeyError(
                f"cfg.MODEL.DINO.{path} is not a setting of DINO's LazyConfig model "
                f"({DEFAULTS_CONFIG}) nor an argument of what it builds there; the keys are "
                f"lower-case, e.g. MODEL.DINO.num_classes"
            )
        if isinstance(value, dict) and key in parent:
            _update(node, value, f"{path}.")
        else:
            OmegaConf.update(node, path, value, merge=False)


def dino_kwargs_from_yacs(cfg: CN) -> Dict[str, Any]:
    """The keyword arguments of :class:`DINO` for a yacs config prepared by
    :func:`add_dino_config`: the LazyConfig's model with ``MODEL.DINO`` applied, the backbone
    built by ``build_backbone(cfg)``."""
    if "DINO" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.DINO is missing: call dino_d2.config.add_dino_config(cfg) first")
    model = _lazy_model()
    _update(model, cfg.MODEL.DINO)
    model.pixel_mean = list(cfg.MODEL.PIXEL_MEAN)
    model.pixel_std = list(cfg.MODEL.PIXEL_STD)
    model.input_format = cfg.INPUT.FORMAT
    OmegaConf.resolve(model)
    bottom_up = build_backbone(cfg)
    model.backbone.bottom_up = bottom_up
    model.backbone.in_features = list(bottom_up.output_shape())
    return {key: instantiate(value) for key, value in model.items() if key != "_target_"}
