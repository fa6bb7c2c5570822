"""The inputs a benchmark times a model on: random images (with random boxes for training), the
first images of a config's test set, and a batch padded as an exported graph takes it."""

import itertools
import logging
from typing import Dict, List, Tuple

import torch
from omegaconf import OmegaConf
from torch import Tensor

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances

from ..data import register_builtin_datasets
from ..export.verify import pad_images

__all__ = ["random_batches", "padded_batch", "dataset_batches"]

logger = logging.getLogger(__name__)


def random_batches(
    num_batches: int,
    batch_size: int,
    height: int,
    width: int,
    *,
    num_boxes: int = 0,
    num_classes: int = 1,
    seed: int = 0,
) -> List[List[Dict]]:
    """``num_batches`` references to one batch of random images, with boxes for training.

    Args:
        num_batches: length of the returned list (every item is the same batch).
        batch_size: images per batch.
        height, width: image size in pixels.
        num_boxes: ground-truth boxes per image; 0 gives inference inputs (no ``instances``).
        num_classes: classes are drawn from ``0..num_classes-1``.
        seed: seed of the random generator.

    Returns:
        batches of dicts with ``image`` (3, height, width) float32 holding whole numbers in
        0-255 (what a uint8 image holds) and, with
        ``num_boxes``, ``instances`` holding ``gt_boxes`` (absolute XYXY inside the image, each
        side at least 1/20 of the image's) and ``gt_classes`` (int64).
    """
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        pixels = torch.randint(256, (3, height, width), generator=generator)
        item = {"image": pixels.to(torch.float32)}
        if num_boxes:
            size = torch.tensor([width, height], dtype=torch.float32)
            wh = (0.05 + 0.45 * torch.rand(num_boxes, 2, generator=generator)) * size
            x0y0 = torch.rand(num_boxes, 2, generator=generator) * (size - wh)
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(torch.cat([x0y0, x0y0 + wh], dim=1))
            instances.gt_classes = torch.randint(num_classes, (num_boxes,), generator=generator)
            item["instances"] = instances
        batch.append(item)
    return [batch] * num_batches


def padded_batch(batch: List[Dict], dtype: torch.dtype = torch.uint8) -> Tuple[Tensor, Tensor]:
    """One batch of model inputs as an exported graph takes it: ``(images, image_sizes)``.

    Args:
        batch: dicts with ``image`` (3, H, W), 0-255.
        dtype: of the padded ``images`` (N, 3, max H, max W); each image in its top-left corner.
    """
    return pad_images([item["image"].round().to(dtype) for item in batch])


def dataset_batches(cfg, num_batches: int, batch_size: int) -> List[List[Dict]]:
    """Batches of the first images of ``cfg.dataloader.test`` (read and resized by its mapper).

    A dataset with fewer images than needed is cycled through.
    """
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
    register_builtin_datasets([names] if isinstance(names, str) else list(names))
    needed = num_batches * batch_size
    inputs = []
    for batch in instantiate(cfg.dataloader.test):
        inputs.extend(batch)
        if len(inputs) >= needed:
            break
    if not inputs:
        raise ValueError(f"the test data loader of the config ({names}) yields no images")
    if len(inputs) < needed:
        logger.info(f"The test set has {len(inputs)} images; cycling through them")
    inputs = list(itertools.islice(itertools.cycle(inputs), needed))
    return [inputs[i : i + batch_size] for i in range(0, needed, batch_size)]
