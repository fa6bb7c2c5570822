"""Helpers shared by the encoder and the decoder: building a stack of identical layers and
running one layer, optionally under activation checkpointing."""

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["stack_layers", "run_layer", "xavier_init_except"]


def stack_layers(layer_type: Callable[..., nn.Module], num_layers: int, **kwargs: Any):
    """``nn.ModuleList`` of ``num_layers`` independently initialized ``layer_type(**kwargs)``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return nn.ModuleList(layer_type(**kwargs) for _ in range(num_layers))


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
