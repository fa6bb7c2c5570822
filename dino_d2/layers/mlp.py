"""The small multi-layer perceptron used for box heads and query position heads."""

import torch
from torch import nn

from .linear import linear

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last).

    The Linear layers live in ``layers`` (``layers.0``, ``layers.1``, ...), the naming of the
    DETR family's checkpoints.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (..., input_dim) to (..., output_dim)."""
        for layer in self.layers[:-1]:
            x = linear(x, layer.weight, layer.bias, "relu")
        last = self.layers[-1]
        return linear(x, last.weight, last.bias)
