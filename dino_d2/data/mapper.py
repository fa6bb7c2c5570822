"""Detectron2's ``DatasetMapper`` for DINO, with clear errors for unreadable images.

:class:`DatasetMapper` maps a Detectron2 dataset dict to the model's input exactly as
Detectron2's does for boxes (``_transform_annotations``: boxes transformed, clipped to the image,
empty ones removed), with three differences:

* an image that cannot be read (missing, truncated or not an image) raises
  :class:`UnreadableImageError`, naming the file and the dataset (Detectron2 raises the bare
  PIL or OS error, without the dataset); with ``skip_unreadable=True`` a training mapper logs a
  warning and returns None instead, and the training loader (``MapDataset``; see
  :func:`dino_d2._compat.build_detection_train_loader` for v0.6) serves another image.
  Evaluation never skips: every image counts in the metrics;
* 16-bit grayscale images (PIL modes ``I;16*``, and ``I``, which some Pillow versions give
  16-bit PNGs) are scaled to 0-255 (``value / 257``); Detectron2's
  ``read_image`` saturates them to 255;
* semantic segmentation and precomputed proposals are not mapped (DINO uses neither).

Grayscale, palette and RGBA images are converted to ``image_format`` by Detectron2's
``read_image`` (alpha dropped).
"""

import copy
import logging
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.data import DatasetMapper as _DetectronDatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

__all__ = ["DatasetMapper", "UnreadableImageError", "read_image"]

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file of a dataset is missing or cannot be decoded."""


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """Detectron2's ``read_image``, with 16-bit grayscale images scaled to 8 bits.

    Args:
        file_name: the image path (anything Detectron2's PathManager opens).
        format: as for Detectron2's ``read_image`` ("RGB", "BGR", "L", ...).

    Returns:
        (H, W, C) uint8 for the color formats, as Detectron2's.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        if image.mode not in _SIXTEEN_BIT_MODES:
            image = None
        else:
            image = ImageOps.exif_transpose(image)
            values = np.asarray(image, dtype=np.float64) / 257.0
            image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image is None:
        return utils.read_image(file_name, format=format)
    return utils.convert_PIL_to_numpy(image, format)


class DatasetMapper(_DetectronDatasetMapper):
    """Detectron2's ``DatasetMapper`` (same arguments) plus two keyword arguments.

    Args:
        dataset_name: the dataset(s) the dicts come from, named in errors (configs set it to
            the loader's ``dataset.names``).
        skip_unreadable: in training, skip an unreadable image with a warning instead of
            raising (see the module docstring).
        *args, **kwargs: Detectron2's ``DatasetMapper`` arguments (``is_train``,
            ``augmentations``, ``image_format``, ...).
    """

    def __init__(self, *args, dataset_name="", skip_unreadable: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset_name = dataset_name
        self.skip_unreadable = bool(skip_unreadable)

    def _read(self, dataset_dict: Dict) -> Optional[np.ndarray]:
        file_name = dataset_dict["file_name"]
        try:
            image = read_image(file_name, format=self.image_format)
        except Exception as error:
            message = (
                f"cannot read image {file_name} of dataset {self.dataset_name or '(unnamed)'}: "
                f"{type(error).__name__}: {error}"
            )
            if self.is_train and self.skip_unreadable:
                logger.warning(f"{message}; skipped (skip_unreadable=True)")
                return None
            raise UnreadableImageError(
                f"{message}. Fix the file or remove its entry from the dataset's json, or set "
                "dataloader.train.mapper.skip_unreadable=True to skip it in training."
            ) from error
        utils.check_image_size(dataset_dict, image)
        return image

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """Maps one dataset dict: ``image`` (C, H, W) uint8 tensor and, in training,
        ``instances`` with absolute XYXY ``gt_boxes`` in the augmented image."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read(dataset_dict)
        if image is None:
            return None
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
