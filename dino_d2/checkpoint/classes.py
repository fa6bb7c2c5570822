"""Class-row selection: from a head indexed by dataset category id to contiguous classes.

The DINO authors index their class heads (and the denoising label embedding) by the COCO category
id itself (91 rows, ids 1..90 with gaps, row 0 and ten more never trained). Detectron2, detrex,
EasyCV and dino_d2 use 80 contiguous indices in the order of the sorted category ids, which is the
order of :data:`detectron2.data.datasets.builtin_meta.COCO_CATEGORIES`.
"""

from typing import Callable, List, Sequence

import torch

__all__ = ["coco_category_ids", "select_rows"]


def coco_category_ids() -> List[int]:
    """The 80 COCO thing category ids; entry ``j`` is the id of contiguous class ``j``."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def select_rows(rows: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform taking rows ``rows`` (in that order) of a weight ``(R, ...)`` or bias ``(R,)``.

    Raises:
        IndexError (when applied): a row beyond the tensor's first dimension.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long)

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if len(index) and int(index.max()) >= tensor.shape[0]:
            raise IndexError(
                f"class row {int(index.max())} requested from a tensor with {tensor.shape[0]} rows"
            )
        return tensor.index_select(0, index).contiguous()

    return transform
