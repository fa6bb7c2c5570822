"""Convolutions followed by a frozen batch norm, run as one convolution.

Detectron2's backbones (ResNet, RegNet) build every convolution as ``detectron2.layers.Conv2d``
with a ``norm``; with ``FrozenBatchNorm2d`` that norm is a fixed per-channel affine map
``y * scale + shift``, and applying it is a full pass over the activations in the forward (and,
in training, the backward) pass. Folded into the convolution, ``conv(x, w * scale) + shift``
gives the same result (up to float rounding) without that pass. Under autograd the folded
weight is computed from the current parameters on every call; without it (inference) it is
computed once, in the precision autocast computes in when autocast is on, and again whenever a
parameter or statistic changes (:mod:`dino_d2.layers.inference_weights`). So training the
convolution, loading a checkpoint or moving the model need nothing more, and the module keeps
its parameters, buffers and state-dict keys.
"""

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from .inference_weights import autocast_dtype, derived_weight, use_derived_weights

__all__ = ["FrozenBNConv2d", "fold_frozen_batchnorm"]


class FrozenBNConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``, run as one convolution.

    Same parameters, buffers and state-dict keys as the ``Conv2d`` it replaces (see
    :func:`fold_frozen_batchnorm`).
    """

    def folded(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """The folded ``(weight, bias)``, in ``dtype`` (default: the weight's own)."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        weight = self.weight * scale.view(-1, 1, 1, 1)
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype)
        return weight, bias

    def folded_for(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The folded ``(weight, bias)`` to convolve ``x`` with now: at inference folded once, in
        the precision autocast computes in (if it is on); under autograd from the current
        parameters."""
        if not use_derived_weights():
            return self.folded()
        dtype = autocast_dtype(x)
        norm = self.norm
        sources = (self.weight, self.bias, norm.weight, norm.bias)
        sources += (norm.running_mean, norm.running_var)
        return derived_weight(
            self, f"folded/{dtype}", sources, functools.partial(self.folded, dtype)
        )

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded_for(x)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Turns every ``detectron2.layers.Conv2d`` of ``module`` whose ``norm`` is a
    ``FrozenBatchNorm2d`` into a :class:`FrozenBNConv2d`, in place.

    Returns:
        the number of convolutions folded.
    """
    folded = 0
    for child in module.modules():
        if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d):
            child.__class__ = FrozenBNConv2d
            folded += 1
    return folded
