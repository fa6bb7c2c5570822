"""ResNet blocks whose ReLUs and residual adds run inside oneDNN's convolutions.

Detectron2's ResNet blocks (``BasicStem``, ``BasicBlock``, ``BottleneckBlock``) follow every
convolution but the last with ``F.relu_`` and end with ``out += shortcut; relu_(out)``: each of
those is a separate pass over the activations. oneDNN applies them as post-ops of the
convolution that produces the activations (``torch.ops.mkldnn._convolution_pointwise``, the op
TorchInductor emits for CPU convolutions): a ReLU, or a sum with the shortcut followed by a ReLU.
Once the blocks' frozen batch norms are folded (:mod:`dino_d2.layers.frozen_bn`) a block is its
convolutions and these passes, so for ResNet-50 all 49 ReLUs and 16 residual adds disappear.

:func:`fuse_resnet_blocks` swaps the class of every such block (exactly Detectron2's classes,
with folded convolutions) in place; parameters, buffers, state-dict keys and hooks are unchanged.
The fused forward runs where the folded weights are cached (inference: no autograd, tracing or
export, see :func:`dino_d2.layers.inference_weights.use_derived_weights`), on the CPU with
oneDNN, in float32 or in the precision CPU autocast computes in; elsewhere it is Detectron2's
forward. The block's input is never written to (the sum goes into a new tensor).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock

from .frozen_bn import FrozenBNConv2d
from .inference_weights import autocast_dtype, use_derived_weights

__all__ = ["FusedBasicBlock", "FusedBasicStem", "FusedBottleneckBlock", "fuse_resnet_blocks"]


def _onednn_convolutions() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def _fused(x: Tensor) -> bool:
    """Whether the fused convolutions run on ``x``: CPU inference with oneDNN, in float32 or
    under CPU autocast to bfloat16 where oneDNN computes bfloat16 convolutions (it refuses them
    on a CPU without AVX-512: there the blocks run Detectron2's ops, which autocast handles)."""
    if x.device.type != "cpu" or not use_derived_weights() or not _onednn_convolutions():
        return False
    dtype = autocast_dtype(x)
    if dtype is None:
        return x.dtype == torch.float32
    return (
        dtype == torch.bfloat16
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def conv_relu(conv: FrozenBNConv2d, x: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
    """``relu(conv(x))``, or ``relu(conv(x) + shortcut)``, as one oneDNN convolution where the
    fused path runs (see the module docstring), else as the separate ops.

    Args:
        conv: a folded convolution without an activation of its own.
        x: (N, C_in, H, W) input.
        shortcut: optional (N, C_out, H', W') tensor added before the ReLU (not written to).

    Returns:
        (N, C_out, H', W'), in bfloat16 under CPU autocast to bfloat16.
    """
    if not _fused(x):
        out = conv(x)
        if shortcut is not None:
            out += shortcut
        return F.relu_(out)
    weight, bias = conv.folded_for(x)
    x = x.to(weight.dtype)
    geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
    if shortcut is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, "relu", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, shortcut.to(weight.dtype), weight, bias, *geometry, "add", 1.0, "relu", [], ""
    )


class FusedBasicStem(BasicStem):
    """Detectron2's ``BasicStem`` with its ReLU inside the convolution."""

    def forward(self, x: Tensor) -> Tensor:
        """Maps (N, 3, H, W) to (N, C, H / 4, W / 4)."""
        return F.max_pool2d(conv_relu(self.conv1, x), kernel_size=3, stride=2, padding=1)


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.shortcut is None else block.shortcut(x)


class FusedBasicBlock(BasicBlock):
    """Detectron2's ``BasicBlock`` with its ReLUs and residual add inside the convolutions."""

    def forward(self, x: Tensor) -> Tensor:
        """Maps (N, C_in, H, W) to (N, C_out, H / stride, W / stride)."""
        out = conv_relu(self.conv1, x)
        return conv_relu(self.conv2, out, _shortcut(self, x))


class FusedBottleneckBlock(BottleneckBlock):
    """Detectron2's ``BottleneckBlock`` with its ReLUs and residual add inside the
    convolutions."""

    def forward(self, x: Tensor) -> Tensor:
        """Maps (N, C_in, H, W) to (N, C_out, H / stride, W / stride)."""
        out = conv_relu(self.conv2, conv_relu(self.conv1, x))
        return conv_relu(self.conv3, out, _shortcut(self, x))


_FUSED = {
    BasicStem: (FusedBasicStem, ("conv1",)),
    BasicBlock: (FusedBasicBlock, ("conv1", "conv2")),
    BottleneckBlock: (FusedBottleneckBlock, ("conv1", "conv2", "conv3")),
}


def fuse_resnet_blocks(model: nn.Module) -> int:
    """Swaps every Detectron2 ResNet stem and block of ``model`` whose convolutions are folded
    (:class:`~dino_d2.layers.frozen_bn.FrozenBNConv2d` without an activation) for its fused
    class, in place; fold the batch norms first.

    Returns:
        the number of stems and blocks swapped.
    """
    swapped = 0
    for module in model.modules():
        fused, conv_names = _FUSED.get(type(module), (None, ()))
        convs = [getattr(module, name, None) for name in conv_names]
        if fused is None or not all(
            type(conv) is FrozenBNConv2d and conv.activation is None for conv in convs
        ):
            continue
        module.__class__ = fused
        swapped += 1
    return swapped
