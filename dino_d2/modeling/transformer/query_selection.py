"""Two-stage mixed query selection (DINO, Sec. 3.4).

Every encoder token proposes a box centred on its pixel; a class head scores the tokens, the
top-k of them become the decoder's anchors (positional queries) while the content queries are a
learned embedding ("mixed": positions from the image, content static).

Boxes are normalized cxcywh in [0, 1] relative to each image's real (unpadded) size.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dino_d2.layers.multi_scale_levels import MultiScaleLevels

from .decoder import build_box_head, build_class_head

__all__ = ["MixedQuerySelection", "SelectedQueries", "gen_encoder_output_proposals"]


@dataclass
class SelectedQueries:
    """The decoder's matching queries chosen from the encoder's proposals.

    Attributes:
        content: (N, k, C) learned content queries ``tgt_embed`` (the same for every image).
        anchors: (N, k, 4) detached refined proposals of the selected tokens in logit space
            (``sigmoid`` gives normalized cxcywh; +inf for a selected invalid token).
        enc_logits: (N, k, K) class logits of the selected tokens (for the encoder loss).
        enc_boxes: (N, k, 4) sigmoid of the refined proposals, NOT detached (for the encoder
            loss).
        indices: (N, k) int64 positions of the selected tokens in the flattened sequence.
        enc_states: (N, k, C) the selected tokens' projected memory (``enc_output_norm``
            output), NOT detached: what the encoder heads read, for extra heads' proposal
            outputs.
    """

    content: Tensor
    anchors: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    indices: Tensor
    enc_states: Tensor


def gen_encoder_output_proposals(
    memory: torch.Tensor, levels: MultiScaleLevels, base_wh: float = 0.05
):
    """One box proposal per encoder token, in logit space, as the DINO authors make them.

    The token at pixel ``(i, j)`` of level ``l`` proposes the box centred at
    ``((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l)`` with width and height
    ``base_wh * 2 ** l``. A proposal is valid when all four coordinates lie in (0.01, 0.99).
    Proposals of padded or invalid tokens are set to +inf (a box of ones after the sigmoid) and
    their memory to zero.

    Args:
        memory: (N, S, C) encoder output.
        levels: the geometry of the batch (shapes, valid sizes, padding mask).
        base_wh: size of the level-0 proposals.

    Returns:
        output_memory: (N, S, C) ``memory`` with padded and invalid tokens zeroed.
        output_proposals: (N, S, 4) ``inverse_sigmoid`` (unclamped logit) of the proposals.
        valid: (N, S) bool, True where the proposal is valid (padded tokens are never valid).
    """
    n = memory.shape[0]
    padding_mask = levels.padding_mask
    proposals = []
    for lvl, (h, w) in enumerate(levels.shapes):
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = levels.valid_sizes[:, lvl].view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_wh * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(~valid[..., None], float("inf"))
    output_memory = memory.masked_fill(~valid[..., None], 0.0)
    return output_memory, proposals, valid


class MixedQuerySelection(nn.Module):
    """Scores the encoder tokens and turns the top-k into decoder queries.

    ``enc_output`` + ``enc_output_norm`` project the (masked) memory; the encoder heads
    ``class_embed`` and ``bbox_embed`` (separate from the decoder's, initialized the same way)
    score each token and refine its proposal in logit space. The ``num_queries`` tokens with the
    largest max-class logit are selected; padded tokens are excluded from that ranking (their
    score is set to -inf; see ``exclude_invalid``). The learned ``tgt_embed`` gives the content
    queries.

    Args:
        embed_dim: channels C.
        num_classes: K.
        num_queries: k, the number of selected tokens / matching queries.
        prior_prob: focal-loss prior of the class-head bias.
        base_wh: size of the level-0 proposals (doubling with every level).
        exclude_invalid: also exclude the unpadded tokens whose proposal is invalid (a
            coordinate outside (0.01, 0.99), e.g. the border pixels of large maps). False keeps
            the authors' behaviour, where such tokens (zeroed memory, proposal = +inf) can be
            selected.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_classes: int,
        num_queries: int = 900,
        prior_prob: float = 0.01,
        base_wh: float = 0.05,
        exclude_invalid: bool = False,
    ):
        super().__init__()
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.enc_output.weight)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        self.class_embed = build_class_head(embed_dim, num_classes, prior_prob)
        self.bbox_embed = build_box_head(embed_dim)
        self.tgt_embed = nn.Embedding(num_queries, embed_dim)
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.base_wh = base_wh
        self.exclude_invalid = exclude_invalid

    def forward(self, memory: torch.Tensor, levels: MultiScaleLevels) -> SelectedQueries:
        """Selects the queries.

        Args:
            memory: (N, S, C) encoder output.
            levels: the geometry of the batch.

        Returns:
            The :class:`SelectedQueries`. If an image has fewer than k selectable tokens, padded tokens fill the rest; if the
            maps have fewer than k tokens in all (tiny images), the selected tokens repeat
            cyclically so that every one of the k content queries still gets an anchor.
        """
        output_memory, proposals, valid = gen_encoder_output_proposals(memory, levels, self.base_wh)
        padding_mask = levels.padding_mask
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = self.class_embed(output_memory)
        coords = self.bbox_embed(output_memory) + proposals

        excluded = ~valid if self.exclude_invalid else padding_mask
        topk = self.rank(logits.max(-1)[0].masked_fill(excluded, float("-inf")))
        enc_logits = torch.gather(logits, 1, topk[..., None].expand(-1, -1, logits.shape[-1]))
        selected = torch.gather(coords, 1, topk[..., None].expand(-1, -1, 4))
        content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        states = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, self.embed_dim))
        return SelectedQueries(
            content=content,
            anchors=selected.detach(),
            enc_logits=enc_logits,
            enc_boxes=selected.sigmoid(),
            indices=topk,
            enc_states=states,
        )

    def rank(self, scores: Tensor) -> Tensor:
        """The selected tokens, best first: (N, k) int64 positions of the ``num_queries`` largest
        of ``scores`` (N, S) (each token's best class logit, -inf where excluded), repeated
        cyclically when there are fewer than k tokens. A comparison of two runs can put another
        run's choice here (:func:`dino_d2.export.ties.forced_tokens`)."""
        # sym_min and an unconditional cyclic index keep an exported graph free of a branch on
        # the number of tokens (the index is the identity when there are enough tokens).
        num_tokens = scores.shape[1]
        if isinstance(num_tokens, torch.SymInt):
            k = torch.sym_min(self.num_queries, num_tokens)
        else:  # an int, or a 0-d tensor under torch.jit.trace (fvcore's FLOP count)
            k = min(self.num_queries, int(num_tokens))
        topk = torch.topk(scores, k, dim=1)[1]
        positions = torch.arange(self.num_queries, device=topk.device)
        return topk[:, positions % torch.full_like(positions[:1], k)]
