"""Contrastive denoising (CDN): the training-only DN queries of DINO.

Every ground-truth box is turned into one *positive* query (a slightly jittered box that should be
reconstructed to the ground truth) and one *negative* query (a box jittered further, which should
be classified as background) per denoising group. The groups are prepended to the matching queries
and an attention mask keeps information from leaking between them.

Layout of the ``Q_dn`` denoising queries of every image (``M`` = most boxes in any image of the
batch, ``group_size = 2 * M``): group ``g`` occupies ``[g * 2M, (g + 1) * 2M)``; its positive query
for box ``j`` sits at ``g * 2M + j`` and its negative query at ``g * 2M + M + j``. Slots ``j >= G_i``
of an image with fewer boxes are padding: zero content and the box ``(0.5, 0.5, 0.5, 0.5)``
(its inverse sigmoid is exactly 0, the authors' zero padding in logit space).

Choices (pinned by ``tests/modeling/test_denoising.py``):

* Number of groups = ``max(1, dn_number // M)``; ``dn_number`` is *not* doubled first. The
  authors compute ``(2 * dn_number) // (2 * M)``, which is the same number, but only when
  ``2 * dn_number >= 100``; below that they use ``2 * dn_number`` groups whatever ``M`` is. That
  quirk is not reproduced (detrex does not reproduce it either). A batch with more boxes than
  ``dn_number`` (say 500 boxes, ``dn_number=100``) keeps one group.
* Nothing to denoise (``dn_number <= 0``, an empty batch, or no image with a box) returns ``None``:
  the model then runs without DN queries and :class:`DINOCriterion` reports zero DN losses under
  the usual keys. The authors instead build a zero-size DN part in that case, which has the same
  effect.
* Label noise: every DN label is replaced, with probability ``label_noise_ratio * 0.5``, by a class
  drawn uniformly from ``[0, num_classes)``, which may be the same class again (as the authors do),
  so the observed change rate is ``label_noise_ratio * 0.5 * (1 - 1 / num_classes)``. Positives
  and negatives are both noised.
* Box noise, on the corners: each of ``x1, y1, x2, y2`` moves by ``s * u * (w / 2 or h / 2) *
  box_noise_scale`` with a random sign ``s`` and ``u ~ U[0, 1)`` for positives, ``u ~ U[1, 2)`` for
  negatives; corners are clamped to [0, 1] and converted back to cxcywh. As with the authors, a
  negative box may come out with a non-positive width or height (its inverse sigmoid then hits the
  eps floor in the transformer).
* Attention mask (True = blocked): matching queries see no DN query; a DN query sees its own group
  (padding included) and every matching query, but no other group.

The random draws happen in the authors' order on tensors of the authors' shapes (all boxes of the
batch flattened, repeated ``2 * num_groups`` times as [group 0 positives, group 0 negatives, group 1
positives, ...]), so the same generator state gives the same noise.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["ContrastiveDenoising", "DenoisingQueries"]


@dataclass
class DenoisingQueries:
    """The denoising queries of one batch and what the criterion needs to supervise them.

    Attributes:
        content: (N, Q_dn, C) content queries: label embeddings of the noised labels, zero padding.
        boxes: (N, Q_dn, 4) noised boxes, normalized cxcywh (not inverse-sigmoided); padding is 0.5.
        attn_mask: (Q_dn + num_queries, Q_dn + num_queries) bool self-attention mask over the
            decoder queries (DN queries first), True = may not attend; None when Q_dn is 0.
        num_groups: number of denoising groups.
        group_size: queries per group, ``2 * M`` (M positives then M negatives, M = most boxes in
            any image of the batch).
        positive_indices: one ``(query_idx, target_idx)`` pair of int64 tensors per image, in the
            format of :class:`HungarianMatcher`: ``query_idx`` indexes the Q_dn axis,
            ``target_idx`` that image's targets; ``num_groups * G_i`` entries each.
    """

    content: Tensor
    boxes: Tensor
    attn_mask: Optional[Tensor]
    num_groups: int
    group_size: int
    positive_indices: List[Tuple[Tensor, Tensor]]

    @property
    def num_dn_queries(self) -> int:
        """Q_dn, the number of denoising queries per image (padding included)."""
        return self.num_groups * self.group_size


class ContrastiveDenoising(nn.Module):
    """Builds DINO's contrastive denoising queries from the ground truth (training only).

    See the module docstring for the query layout, the noise and the choices made.

    Args:
        num_classes: number of classes K; labels are in ``[0, K)``.
        embed_dim: width C of the content queries.
        dn_number: denoising query budget per image; groups = ``max(1, dn_number // M)``.
        label_noise_ratio: a label is redrawn with probability ``label_noise_ratio * 0.5``.
        box_noise_scale: lambda; positives move corners by < lambda * half the box size,
            negatives by between lambda * half and lambda * the full size.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        embed_dim: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_enc = nn.Embedding(num_classes, embed_dim)

    def num_groups(self, max_targets: int) -> int:
        """Number of denoising groups for a batch whose largest image has ``max_targets`` boxes."""
        return max(1, self.dn_number // max_targets)

    def forward(
        self,
        targets: List[Dict[str, Tensor]],
        num_queries: int,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Optional[DenoisingQueries]:
        """Makes the denoising queries of a batch.

        Args:
            targets: one dict per image with ``labels`` (G_i,) int64 in [0, K) and ``boxes``
                (G_i, 4) normalized cxcywh, on the module's device.
            num_queries: number of matching queries that follow the DN queries in the decoder.
            generator: optional random generator (for reproducible noise); the default generator
                is used when None.

        Returns:
            A :class:`DenoisingQueries`; with zero queries when there is nothing to denoise
            (``dn_number <= 0``, no images, or no image with a box). Those zero queries are
            still made from the label embedding, so that it stays in the autograd graph: in
            distributed training every parameter must take part in every step.
        """
        sizes = [int(t["labels"].shape[0]) for t in targets]
        max_targets = max(sizes, default=0)
        if self.dn_number <= 0 or max_targets == 0:
            return self._no_queries(len(targets))

        device = self.label_enc.weight.device
        batch_size = len(targets)
        num_groups = self.num_groups(max_targets)
        num_copies = 2 * num_groups
        group_size = 2 * max_targets
        num_dn = num_groups * group_size
        total = sum(sizes)

        labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        # Copy c of all the batch's boxes feeds group c // 2: positives if c is even, else negatives.
        noised_labels = labels.repeat(num_copies)
        gt_boxes = boxes.repeat(num_copies, 1)

        noised_labels = self._noise_labels(noised_labels, generator)
        noised_boxes = self._noise_boxes(gt_boxes, total, num_groups, generator)

        counts = torch.tensor(sizes, device=device)
        image_idx = torch.arange(batch_size, device=device).repeat_interleave(counts)
        image_idx = image_idx.repeat(num_copies)
        slot_in_image = torch.cat([torch.arange(n, device=device) for n in sizes])
        copy_offset = torch.arange(num_copies, device=device) * max_targets
        slot = (copy_offset[:, None] + slot_in_image[None, :]).flatten()

        weight = self.label_enc.weight
        content = torch.zeros(batch_size, num_dn, self.embed_dim, dtype=weight.dtype, device=device)
        content[image_idx, slot] = self.label_enc(noised_labels)
        dn_boxes = torch.full((batch_size, num_dn, 4), 0.5, dtype=boxes.dtype, device=device)
        dn_boxes[image_idx, slot] = noised_boxes

        return DenoisingQueries(
            content=content,
            boxes=dn_boxes,
            attn_mask=self._attention_mask(num_dn, group_size, num_queries, device),
            num_groups=num_groups,
            group_size=group_size,
            positive_indices=self._positive_indices(sizes, num_groups, group_size, device),
        )

    def _no_queries(self, batch_size: int) -> DenoisingQueries:
        weight = self.label_enc.weight
        empty = torch.zeros(0, dtype=torch.int64, device=weight.device)
        return DenoisingQueries(
            content=weight[None, :0].expand(batch_size, 0, self.embed_dim),
            boxes=weight.new_zeros(batch_size, 0, 4),
            attn_mask=None,
            num_groups=0,
            group_size=0,
            positive_indices=[(empty, empty)] * batch_size,
        )

    def _noise_labels(self, labels: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        if self.label_noise_ratio <= 0:
            return labels
        draw = torch.rand(labels.shape, generator=generator, device=labels.device)
        chosen = torch.nonzero(draw < self.label_noise_ratio * 0.5).view(-1)
        new_labels = torch.randint(
            0, self.num_classes, chosen.shape, generator=generator, device=labels.device
        )
        return labels.scatter(0, chosen, new_labels)

    def _noise_boxes(
        self, boxes: Tensor, total: int, num_groups: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        if self.box_noise_scale <= 0:
            return boxes
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_size = (boxes[:, 2:] / 2).repeat(1, 2)
        sign = torch.randint(
            0, 2, boxes.shape, generator=generator, device=boxes.device, dtype=torch.float32
        )
        sign = sign * 2.0 - 1.0
        magnitude = torch.rand(
            boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype
        )
        is_negative = (
            torch.arange(2 * num_groups, device=boxes.device) % 2 == 1
        ).repeat_interleave(total)
        magnitude[is_negative] += 1.0
        corners = corners + (magnitude * sign) * half_size * self.box_noise_scale
        corners = corners.clamp(min=0.0, max=1.0)
        return box_convert(corners, "xyxy", "cxcywh")

    @staticmethod
    def _attention_mask(
        num_dn: int, group_size: int, num_queries: int, device: torch.device
    ) -> Tensor:
        size = num_dn + num_queries
        mask = torch.zeros(size, size, dtype=torch.bool, device=device)
        mask[num_dn:, :num_dn] = True
        group = torch.arange(num_dn, device=device) // group_size
        mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
        return mask

    @staticmethod
    def _positive_indices(
        sizes: List[int], num_groups: int, group_size: int, device: torch.device
    ) -> List[Tuple[Tensor, Tensor]]:
        group_start = torch.arange(num_groups, device=device) * group_size
        indices = []
        for n in sizes:
            target_idx = torch.arange(n, device=device).repeat(num_groups)
            query_idx = (group_start[:, None] + torch.arange(n, device=device)[None, :]).flatten()
            indices.append((query_idx, target_idx))
        return indices
