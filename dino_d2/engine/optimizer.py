"""Optimizer parameter groups for DINO: a smaller learning rate for the pretrained backbone."""

from typing import Any, Callable, Dict, List, Optional

from torch import nn

from detectron2.solver.build import reduce_param_groups

__all__ = ["get_optimizer_params"]

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def get_optimizer_params(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    backbone_lr_factor: float = 0.1,
    backbone_prefix: str = "backbone.bottom_up.",
    lr_factor_func: Optional[Callable[[str], float]] = None,
) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: one per distinct (learning rate, weight decay).

    Parameters whose name starts with ``backbone_prefix`` get ``base_lr * backbone_lr_factor``
    (the authors' ``lr_backbone`` of 1e-5 with lr 1e-4); the neck, the transformer and the
    heads get ``base_lr``. Parameters shared by several modules (shared heads) appear once.
    Parameters with the same settings share one group (Detectron2's ``reduce_param_groups``),
    so that AdamW updates each group with its multi-tensor (foreach) kernels instead of one
    tensor at a time.

    Args:
        model: the model; frozen parameters (requires_grad False) are left out.
        base_lr: learning rate of the non-backbone parameters.
        weight_decay: weight decay of every parameter, unless overridden for norms.
        weight_decay_norm: weight decay of normalization layers' parameters; None keeps
            ``weight_decay`` for them (the authors); detrex uses 0.0.
        backbone_lr_factor: multiplier of the backbone's learning rate.
        backbone_prefix: parameter-name prefix of the backbone proper (not the neck).
        lr_factor_func: optional function of a parameter's full name (e.g.
            ``"backbone.bottom_up.net.blocks.3.attn.qkv.weight"``) returning a further factor of
            its learning rate, as in Detectron2 main's ``get_default_optimizer_params``; it
            multiplies with ``backbone_lr_factor`` (layer-wise decay: see
            :class:`dino_d2.engine.ViTLayerDecay`).
    """
    groups = []
    seen = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            lr = base_lr * (backbone_lr_factor if full_name.startswith(backbone_prefix) else 1.0)
            if lr_factor_func is not None:
                lr *= lr_factor_func(full_name)
            decay = weight_decay_norm if is_norm and weight_decay_norm is not None else weight_decay
            groups.append({"params": [param], "lr": lr, "weight_decay": decay})
    return reduce_param_groups(groups)
