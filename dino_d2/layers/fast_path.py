"""The CPU inference fast path, as a transform of a built model.

:func:`optimize_for_cpu_inference` walks a built model and, in place:

* folds every frozen batch norm into the convolution before it
  (:func:`dino_d2.layers.frozen_bn.fold_frozen_batchnorm`);
* runs the ReLUs and residual adds of Detectron2's ResNet blocks inside their folded
  convolutions (:func:`dino_d2.layers.fused_blocks.fuse_resnet_blocks`);
* keeps the backbone's weights in the channels-last memory format, in which oneDNN's
  convolutions need no layout conversions (a convolution with channels-last weights also runs
  its input channels-last);
* turns every plain ``nn.Linear`` into a :class:`OneDNNLinear`, and every ReLU that a module
  declares to follow one of its Linear layers (``linear_relu_pairs()``, e.g. the FFN's
  ``linear1`` + ``activation``) into the Linear layer's fused activation and an ``nn.Identity``,
  as ``torch.ao.quantization.fuse_modules`` fuses a Linear and a ReLU;
* turns every plain :class:`~dino_d2.layers.ffn.FFN` into a :class:`ChunkedFFN`, which runs a
  long token sequence (the encoder's) a block of tokens at a time.

PyTorch's ``F.linear`` on the CPU copies the bias into the output before the matrix product and
a ReLU is another pass over the result: for the encoder's FFN at 800x1333 (22k tokens x 2048
channels) those two passes cost about as much as a third of the product itself. oneDNN's matmul
applies both in the same call (``torch.ops.mkldnn._linear_pointwise``, the op TorchInductor
emits for CPU linears).

The fast path holds under CPU autocast to bfloat16: the fused linears then run oneDNN's bfloat16
matmul (with the bias and ReLU fused as in float32) and the folded convolutions a bfloat16
weight, each weight cast (and folded) once instead of on every call
(:mod:`dino_d2.layers.inference_weights`), and the backbone stays channels-last.

The encoder's FFN at 800x1333 widens 22k tokens to 2048 channels: 182 MB in float32, which the
second matrix product reads back from memory after the first wrote it out. A block of 1,024 tokens
widens to 8 MB (4 MB in bfloat16), which stays in the CPU's cache between the two products; every
token's result is the same, bit for bit, since no product mixes tokens. On the 2-core EPYC this
was developed on, DINO-R50 at 800x1333 ran in 0.93x the time in float32 and in bfloat16 (same
process, same weights), and a fresh inference process peaked at 1,308 MiB instead of 1,425 MiB in
float32.

Every module keeps its parameters, buffers and state-dict keys, and is still called as a module:
forward hooks fire, and a Linear that is not exactly ``nn.Linear`` (a LoRA adapter, a quantized
Linear, any subclass) is left as it is, with the ReLU after it, as is a subclass of ``FFN``. The
transformed modules give the same results as the plain ones to float rounding, and under
autograd, tracing, ``torch.export`` or ``torch.compile`` they run the plain ops, so a transformed
model can still be exported or trained (training does not need the transform; the tools apply it
where they build a model for inference).
"""

import copy
import functools
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ffn import FFN
from .frozen_bn import fold_frozen_batchnorm
from .fused_blocks import fuse_resnet_blocks
from .inference_weights import autocast_dtype, derived_weight, use_derived_weights

__all__ = [
    "ChunkedFFN",
    "OneDNNLinear",
    "onednn_bfloat16_available",
    "optimize_for_cpu_inference",
    "optimize_for_training",
    "optimized_copy",
]

_ACTIVATIONS = ("none", "relu")


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache(maxsize=None)
def onednn_bfloat16_available() -> bool:
    """Whether oneDNN computes bfloat16 matrix products on this CPU (in hardware with
    AVX512-BF16 or AMX, emulated with AVX-512 otherwise)."""
    return _onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_dtype(x: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """The dtype oneDNN's fused matmul runs in, or None where it may not run.

    It runs on the CPU with float32 weights, without autograd, not while compiling, exporting
    or tracing (the op takes no traced values), with oneDNN present: in float32 on float32
    inputs, and in bfloat16 under CPU autocast to bfloat16 (where ``F.linear`` would run in
    bfloat16 too).
    """
    if not (
        x.device.type == "cpu"
        and weight.dtype == torch.float32
        and use_derived_weights()
        and _onednn_available()
    ):
        return None
    if autocast_dtype(x) == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16 if onednn_bfloat16_available() else None
    if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return None


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose bias (and an optional ReLU) run inside oneDNN's matmul.

    Same parameters and state-dict keys as ``nn.Linear``; :func:`optimize_for_cpu_inference`
    makes them from plain ones. Where oneDNN's op does not apply (see the module docstring) the
    forward is ``activation(F.linear(x, weight, bias))``.

    Attributes:
        activation: ``"none"``, or ``"relu"`` when the ReLU that followed the layer was fused
            into it.
    """

    activation: str = "none"

    def forward(self, x: Tensor) -> Tensor:
        """Maps (..., in_features) to (..., out_features); bfloat16 under CPU autocast."""
        dtype = _onednn_dtype(x, self.weight)
        if dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, self.activation, [], ""
            )
        if dtype is not None:
            # The weights in that precision, cast once (not on every call, as autocast would).
            weight, bias = derived_weight(
                self,
                f"weight/{dtype}",
                (self.weight, self.bias),
                functools.partial(_cast, self.weight, self.bias, dtype),
            )
            return torch.ops.mkldnn._linear_pointwise(
                x.to(dtype), weight, bias, self.activation, [], ""
            )
        out = F.linear(x, self.weight, self.bias)
        if self.activation == "relu":
            out = F.relu(out, inplace=not torch.is_grad_enabled())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class ChunkedFFN(FFN):
    """An :class:`~dino_d2.layers.ffn.FFN` that, at inference on the CPU, runs a long sequence
    ``chunk_tokens`` tokens at a time, so that the hidden activations of a block stay in cache
    (see the module docstring).

    Same parameters and state-dict keys as ``FFN``; :func:`optimize_for_cpu_inference` makes
    them from plain ones. Under autograd, while tracing, compiling or exporting, on another device
    or for at most ``2 * chunk_tokens`` tokens it is ``FFN.forward``; otherwise its outputs equal
    ``FFN.forward``'s exactly.

    Attributes:
        chunk_tokens: tokens per block (1,024: 8 MB of float32 hidden activations at 2,048
            channels).
    """

    chunk_tokens: int = 1024

    def forward(self, x: Tensor) -> Tensor:
        """Maps (..., C) to (..., C)."""
        # The sizes are read only at inference: an export must not guard on a dynamic size.
        if x.device.type != "cpu" or not use_derived_weights():
            return super().forward(x)
        channels = x.shape[-1]
        tokens = x.numel() // channels
        if tokens <= 2 * self.chunk_tokens:
            return super().forward(x)
        blocks = x.reshape(tokens, channels).split(self.chunk_tokens)
        return torch.cat([FFN.forward(self, block) for block in blocks]).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"chunk_tokens={self.chunk_tokens}"


def _cast(
    weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype
) -> Tuple[Tensor, Optional[Tensor]]:
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _fuse_relus(model: nn.Module) -> int:
    """Fuses every declared (Linear, ReLU) pair whose parts are exactly ``nn.Linear`` and
    ``nn.ReLU``; returns the number fused."""
    fused = 0
    for module in model.modules():
        pairs = getattr(module, "linear_relu_pairs", None)
        if pairs is None:
            continue
        for linear_name, relu_name in pairs():
            linear = module.get_submodule(linear_name)
            relu = module.get_submodule(relu_name)
            if type(linear) is not nn.Linear or type(relu) is not nn.ReLU:
                continue
            linear.__class__ = OneDNNLinear
            linear.activation = "relu"
            parent, _, name = relu_name.rpartition(".")
            setattr(module.get_submodule(parent), name, nn.Identity())
            fused += 1
    return fused


def optimize_for_cpu_inference(model: nn.Module) -> Dict[str, int]:
    """Applies the CPU inference fast path to ``model`` in place (see the module docstring).

    Args:
        model: a built model, e.g. a :class:`~dino_d2.modeling.DINO` (its ``backbone`` is made
            channels-last; a model without a ``backbone`` attribute is made channels-last
            whole). Load its weights before or after: the state dict is unchanged.

    Returns:
        what changed: ``{"folded_batchnorms": ..., "fused_blocks": ..., "fused_relus": ...,
        "onednn_linears": ..., "chunked_ffns": ...}`` (``fused_blocks``: ResNet stems and blocks
        whose ReLUs and residual adds run inside their convolutions; ``fused_relus``: Linear +
        ReLU pairs; ``onednn_linears`` counts the fused ones too; ``chunked_ffns``: FFNs made
        :class:`ChunkedFFN`).
    """
    folded = optimize_for_training(model)
    blocks = fuse_resnet_blocks(model)
    fused = _fuse_relus(model)
    swapped = chunked = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
        elif type(module) is FFN:
            module.__class__ = ChunkedFFN
            chunked += 1
    return {
        "folded_batchnorms": folded,
        "fused_blocks": blocks,
        "fused_relus": fused,
        "onednn_linears": swapped + fused,
        "chunked_ffns": chunked,
    }


def optimize_for_training(model: nn.Module) -> int:
    """The part of the fast path that also serves training, applied to ``model`` in place: the
    frozen batch norms folded into their convolutions (the folded weight is computed from the
    trainable one on every call, so gradients and checkpoints are unchanged) and the backbone's
    weights channels-last (a model without a ``backbone`` attribute is made channels-last
    whole). The training script applies it to the model it trains.

    Returns:
        the number of batch norms folded.
    """
    folded = fold_frozen_batchnorm(model)
    getattr(model, "backbone", model).to(memory_format=torch.channels_last)
    return folded


def optimized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with the fast path applied; ``model`` itself is
    unchanged (e.g. to evaluate during training, or to compare against)."""
    fast = copy.deepcopy(model).eval()
    optimize_for_cpu_inference(fast)
    return fast
