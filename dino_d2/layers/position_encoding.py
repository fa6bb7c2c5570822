"""Sinusoidal position embeddings: for padded feature maps and for boxes.

Two helpers, both following DINO's reference implementation (IDEA-Research/DINO):

* :class:`PositionEmbeddingSine` turns a padding mask into a ``(N, 2 * num_pos_feats, H, W)``
  embedding of the pixel positions, normalized by each image's *valid* height and width so that
  an image embeds the same way whether or not it is padded.
* :func:`get_sine_pos_embed` embeds normalized coordinates (points or cxcywh boxes); the decoder
  feeds it to its ``ref_point_head``.
"""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "get_sine_pos_embed"]


def _inverse_frequencies(num_pos_feats, temperature, device):
    """``temperature ** (2 * (k // 2) / num_pos_feats)`` for ``k = 0 .. num_pos_feats - 1``."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(angles):
    """Sine of the even and cosine of the odd channels of the last axis, interleaved in pairs."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine embedding of pixel positions, generalized to padded images.

    Each valid pixel gets its 1-based row ``y`` and column ``x`` among the valid pixels (a
    cumulative sum of the non-padding mask). With ``normalize``,
    ``(y + offset) / (valid_height + eps) * scale`` (and likewise for ``x``) is embedded, so the
    embedding only depends on the position relative to the image's real extent. Each coordinate
    gives ``num_pos_feats`` channels, sine and cosine interleaved with frequencies
    ``temperature ** (-2 * (k // 2) / num_pos_feats)``; the ``y`` channels come first.

    The DINO authors use ``temperature=20, offset=0.0`` (what their released checkpoints need);
    detrex uses ``temperature=10000, offset=-0.5``.

    Args:
        num_pos_feats: channels per coordinate; the output has ``2 * num_pos_feats``. Must be even.
        temperature: base of the frequencies.
        normalize: divide by the valid extent and multiply by ``scale``.
        scale: the value the last valid row/column is mapped to (about ``2 * pi``).
        offset: added to the 1-based positions before normalizing.
        eps: added to the valid extent before dividing.
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    @property
    def embed_dim(self) -> int:
        """Channels of the embedding, ``2 * num_pos_feats``."""
        return 2 * self.num_pos_feats

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """Embeds the positions of a padded batch.

        Args:
            mask: (N, H, W) bool, True on padding. The valid region of each image is its top-left
                rectangle.

        Returns:
            (N, 2 * num_pos_feats, H, W) float32 embedding, ``y`` channels first then ``x``.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _inverse_frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)

    def extra_repr(self):
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}, offset={self.offset}"
        )


def get_sine_pos_embed(
    pos: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000
) -> torch.Tensor:
    """Sine embedding of normalized coordinates, in the DINO authors' channel order.

    Every coordinate ``c`` becomes ``num_pos_feats`` channels: ``c * 2 * pi`` divided by
    ``temperature ** (2 * (k // 2) / num_pos_feats)``, sine on even and cosine on odd ``k``.
    The per-coordinate blocks are concatenated in input order except that the first two are
    swapped: ``(x, y)`` gives ``[y, x]`` and ``(cx, cy, w, h)`` gives ``[cy, cx, w, h]``, as the
    authors' ``gen_sineembed_for_position`` does.

    Args:
        pos: (..., k) coordinates, normally in [0, 1].
        num_pos_feats: channels per coordinate (even).
        temperature: base of the frequencies.

    Returns:
        (..., k * num_pos_feats) embedding with the dtype of ``pos`` promoted to at least float32.
    """
    dim_t = _inverse_frequencies(num_pos_feats, temperature, pos.device)
    blocks = _interleave_sin_cos((pos * (2 * math.pi))[..., None] / dim_t).unbind(-2)
    if len(blocks) >= 2:
        blocks = (blocks[1], blocks[0]) + tuple(blocks[2:])
    return torch.cat(blocks, dim=-1)
