"""The feed-forward block shared by the encoder and decoder layers."""

from typing import List, Tuple

import torch
from torch import nn

__all__ = ["FFN"]


class FFN(nn.Module):
    """Post-norm ReLU feed-forward block with its residual connection.

    ``norm(x + dropout(linear2(dropout(relu(linear1(x))))))``, the last sub-block of every
    encoder and decoder layer of DINO. The sub-modules keep the DETR family's names
    (``linear1``, ``linear2``, ``norm``), so checkpoints map onto them one to one. The ReLU is a module,
    ``activation``, declared to follow ``linear1`` (:meth:`linear_relu_pairs`) so that the CPU
    fast path can run it inside the matrix product
    (:func:`dino_d2.layers.fast_path.optimize_for_cpu_inference`).

    Args:
        embed_dim: channels C of the input and output.
        ffn_dim: hidden channels.
        dropout: dropout after the ReLU and after ``linear2`` (0.0 in DINO).
    """

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.activation = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def linear_relu_pairs(self) -> List[Tuple[str, str]]:
        """The (Linear, ReLU) sub-modules that run one after the other, by name."""
        return [("linear1", "activation")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (..., C) to (..., C)."""
        hidden = self.dropout1(self.activation(self.linear1(x)))
        return self.norm(x + self.dropout2(self.linear2(hidden)))
