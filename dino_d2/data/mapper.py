"""Detectron2's ``DatasetMapper`` for DINO, with clear errors for unreadable images.

:class:`DatasetMapper` maps a Detectron2 dataset dict to the model's input exactly as
Detectron2's does for boxes (``_transform_annotations``: boxes transformed, clipped to the image,
empty ones removed) and, with ``use_instance_mask=True``, for masks (``gt_masks``: BitMasks or
PolygonMasks by ``instance_mask_format``, through the same resize, flip and crop), with these
differences:

* an image that cannot be read (missing, truncated or not an image) raises
  :class:`UnreadableImageError`, naming the file and the dataset (Detectron2 raises the bare
  PIL or OS error, without the dataset); with ``skip_unreadable=True`` a training mapper logs a
  warning and returns None instead, and the training loader (``MapDataset``; see
  :func:`dino_d2._compat.build_detection_train_loader` for v0.6) serves another image.
  Evaluation never skips: every image counts in the metrics;
* 16-bit grayscale images (PIL modes ``I;16*``, and ``I``, which some Pillow versions give
  16-bit PNGs) are scaled to 0-255 (``value / 257``); Detectron2's
  ``read_image`` saturates them to 255;
* box-only training does not pay for masks: the annotations are copied without their
  ``segmentation`` (Detectron2 deep-copies the whole dict, polygons included, and then drops
  them), and an evaluation mapper copies no annotation at all;
* with ``use_instance_mask=True``, an image whose annotations have no ``segmentation`` at all
  raises :class:`MissingMasksError` naming the file and the dataset (a dataset without masks,
  such as Objects365, cannot train masks; Detectron2 would give instances without
  ``gt_masks``), an annotation without one among annotations with masks is dropped (as
  Detectron2's ``load_coco_json`` drops an instance without a valid segmentation), and RLE
  masks with ``instance_mask_format="polygon"`` raise naming the option to change;
* semantic segmentation and precomputed proposals are not mapped (DINO uses neither).

Grayscale, palette and RGBA images are converted to ``image_format`` by Detectron2's
``read_image`` (alpha dropped).
"""

import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.data import DatasetMapper as _DetectronDatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

__all__ = ["DatasetMapper", "MissingMasksError", "UnreadableImageError", "read_image"]

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file of a dataset is missing or cannot be decoded."""


class MissingMasksError(ValueError):
    """Masks were asked for (``use_instance_mask=True``) but the annotations have none usable."""


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

    Masks: ``use_instance_mask=True`` keeps each annotation's ``segmentation`` as
    ``instances.gt_masks`` (``instance_mask_format="bitmask"``: ``BitMasks`` (N, H, W) bool in
    the augmented image, needed for RLE such as the digits'; ``"polygon"``: ``PolygonMasks`` in
    absolute pixels, which needs polygons). ``recompute_boxes=True`` replaces the boxes by the
    masks' tight boxes after the augmentation (Detectron2's option; cropped masks give tighter
    boxes than the clipped ones).

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
        self._warned_partial = False

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

    def _copy_annotations(self, dataset_dict: Dict) -> List[Dict]:
        """The annotations to transform: shallow copies, with the ``segmentation`` only when
        masks are asked for (Detectron2's transforms replace the values they change)."""
        annotations = dataset_dict["annotations"]
        if not self.use_instance_mask:
            return [{k: v for k, v in a.items() if k != "segmentation"} for a in annotations]
        where = f"{dataset_dict['file_name']} (dataset {self.dataset_name or '(unnamed)'})"
        kept = [a for a in annotations if a.get("iscrowd", 0) == 0]
        with_masks = [a for a in kept if a.get("segmentation") is not None]
        if kept and not with_masks:
            raise MissingMasksError(
                f"{where}: use_instance_mask=True, but none of the image's {len(kept)} "
                "annotations has a 'segmentation' (polygons or RLE). Train masks on a dataset "
                "with masks, or set the mapper's use_instance_mask=False for boxes only."
            )
        if self.instance_mask_format == "polygon" and any(
            isinstance(a["segmentation"], dict) for a in with_masks
        ):
            raise MissingMasksError(
                f"{where}: the masks are RLE, which instance_mask_format='polygon' cannot hold; "
                "set the mapper's instance_mask_format='bitmask'"
            )
        if len(with_masks) < len(kept) and not self._warned_partial:
            logger.warning(
                f"{where}: {len(kept) - len(with_masks)} of {len(kept)} annotations have no "
                "usable 'segmentation' and are left out of mask training (warned once)"
            )
            self._warned_partial = True
        return [dict(a, segmentation=copy.deepcopy(a["segmentation"])) for a in with_masks]

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """Maps one dataset dict: ``image`` (C, H, W) uint8 tensor and, in training,
        ``instances`` with absolute XYXY ``gt_boxes`` in the augmented image (and
        ``gt_masks`` with ``use_instance_mask``)."""
        annotations = None
        if self.is_train and "annotations" in dataset_dict:
            annotations = self._copy_annotations(dataset_dict)
        dataset_dict = copy.deepcopy({k: v for k, v in dataset_dict.items() if k != "annotations"})
        image = self._read(dataset_dict)
        if image is None:
            return None
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if annotations is not None:
            dataset_dict["annotations"] = annotations
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
