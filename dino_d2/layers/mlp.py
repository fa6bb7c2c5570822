"""The small multi-layer perceptron used for box heads and query position heads."""

from typing import List, Tuple

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last).

    The Linear layers live in ``layers`` (``layers.0``, ``layers.1``, ...), the naming of the
    DETR family's checkpoints; the ReLU after ``layers.i`` is ``activations.i`` (no parameters),
    declared by :meth:`linear_relu_pairs` for the CPU fast path
    (:func:`dino_d2.layers.fast_path.optimize_for_cpu_inference`).

    Args:
        input_dim: channels of the input.
        hidden_dim: channels of every hidden layer.
        output_dim: channels of the output.
        num_layers: number of Linear layers (at least 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.activations = nn.ModuleList(nn.ReLU() for _ in range(num_layers - 1))

    def linear_relu_pairs(self) -> List[Tuple[str, str]]:
        """The (Linear, ReLU) sub-modules that run one after the other, by name."""
        return [(f"layers.{i}", f"activations.{i}") for i in range(len(self.activations))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (..., input_dim) to (..., output_dim)."""
        for layer, activation in zip(self.layers, self.activations):
            x = activation(layer(x))
        return self.layers[-1](x)
