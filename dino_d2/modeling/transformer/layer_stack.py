"""Helpers shared by the encoder and the decoder: a stack of layers cloned from one prototype
(DETR's ``_get_clones``), each initialised on its own, and running one layer, optionally under
activation checkpointing."""

import copy
import inspect
import warnings
from typing import Any, Dict, Optional, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["clone_layers", "prototype_layer", "reset_module", "run_layer", "xavier_init_except"]


def reset_module(module: nn.Module) -> None:
    """Initialises every parameter of ``module`` again, as its constructors did.

    Runs each module's own ``reset_parameters()`` (``_reset_parameters()`` for
    ``nn.MultiheadAttention``), children before their parent, in registration order: the order
    in which constructors that build their children and then initialise themselves ran them. A
    module built under a seed and a copy reset under the same seed get the same values.
    """
    for child in module.children():
        reset_module(child)
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if callable(reset):
        reset()


def clone_layers(layer: nn.Module, num_layers: int) -> nn.ModuleList:
    """``nn.ModuleList`` of ``num_layers`` layers like ``layer``, independently initialised.

    The first entry is ``layer`` itself; every other one is a deep copy initialised again by
    :func:`reset_module`. No parameter is shared, and the random draws are those of building
    ``num_layers`` layers one after the other (so a seeded model keeps its weights).

    Raises:
        ValueError: when ``num_layers`` is below 1.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    layers = [layer]
    for _ in range(num_layers - 1):
        clone = copy.deepcopy(layer)
        reset_module(clone)
        layers.append(clone)
    return nn.ModuleList(layers)


def prototype_layer(
    layer: Optional[nn.Module], layer_type: Type[nn.Module], owner: str, keywords: Dict[str, Any]
) -> nn.Module:
    """The layer a stack clones: ``layer``, or one built from the layer keywords the stack
    itself took before (deprecated, accepted for one release with a DeprecationWarning).

    Args:
        layer: the built prototype, or None.
        layer_type: the class of the stack's layers; its constructor's keyword names are the
            deprecated keywords, and a given ``layer`` answers them as attributes.
        owner: the stack's class name, for the messages.
        keywords: the layer keywords given to the stack (empty when none).

    Raises:
        TypeError: for a keyword that ``layer_type`` does not take.
    """
    if layer is not None and not keywords:
        return layer
    names = list(inspect.signature(layer_type).parameters)
    unknown = sorted(set(keywords) - set(names))
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}")
    given = ", ".join(sorted(keywords)) or "none"
    warnings.warn(
        f"{owner} built without layer= (layer keywords given to it: {given}) is deprecated and "
        f"will be removed; pass layer={layer_type.__name__}(...) (in a LazyConfig, set "
        f"layer=L({layer_type.__name__})(...) and its keys as <{owner.lower()}>.layer.<key>)",
        DeprecationWarning,
        stacklevel=3,
    )
    base = {} if layer is None else {name: getattr(layer, name) for name in names}
    return layer_type(**{**base, **keywords})


def run_layer(layer: nn.Module, *args: Any, use_checkpoint: bool = False) -> Any:
    """``layer(*args)``; under ``torch.utils.checkpoint`` when ``use_checkpoint`` is set, the
    layer is in training mode and autograd is enabled (outputs and gradients are unchanged,
    activations are recomputed in the backward pass instead of stored)."""
    if use_checkpoint and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def xavier_init_except(module: nn.Module, skip: nn.Module) -> None:
    """Xavier-uniform init of every matrix of ``module`` outside ``skip`` (which inits itself).

    This is the DINO authors' scheme: xavier on all parameters with more than one dimension, the
    deformable attention keeping its own initialization, biases and norms left at their defaults.
    """
    skipped = {id(p) for p in skip.parameters()}
    for p in module.parameters():
        if p.dim() > 1 and id(p) not in skipped:
            nn.init.xavier_uniform_(p)
