"""The feed-forward block shared by the encoder and decoder layers."""

import torch
from torch import nn

from .linear import linear

__all__ = ["FFN"]


class FFN(nn.Module):
    """Post-norm ReLU feed-forward block with its residual connection.

    ``norm(x + dropout(linear2(dropout(relu(linear1(x))))))``, the last sub-block of every
    encoder and decoder layer of DINO. The sub-modules keep the DETR family's names
    (``linear1``, ``linear2``, ``norm``), so checkpoints map onto them one to one. In CPU
    inference the bias and the ReLU run inside the matrix products (:func:`linear`).

    Args:
        embed_dim: channels C of the input and output.
        ffn_dim: hidden channels.
        dropout: dropout after the ReLU and after ``linear2`` (0.0 in DINO).
    """

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (..., C) to (..., C)."""
        hidden = self.dropout1(linear(x, self.linear1.weight, self.linear1.bias, "relu"))
        return self.norm(x + self.dropout2(linear(hidden, self.linear2.weight, self.linear2.bias)))
