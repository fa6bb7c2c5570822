"""Detectron2 dataset dicts read by index from a memory-mapped COCO cache.

:class:`CachedCocoDataset` is a map-style ``torch.utils.data.Dataset`` over the cache of
:mod:`dino_d2.data.coco_cache`: ``dataset[i]`` builds the ``i``-th dataset dict from a few
slices of the maps, the same dict the json path builds (:func:`coco_to_dataset_dicts`), with the
boxes as float32 values and the segmentations in the json path's form. It pickles as its folder, image folder and index (the maps are reopened
lazily in each process), so data-loader workers, forked or spawned, share the page cache and
copy nothing.

:func:`dino_d2.data.datasets.get_detection_dataset` hands it to the data loaders.
"""

import json
import os
from typing import Dict

import numpy as np
from torch.utils.data import Dataset

from detectron2.structures import BoxMode

from .coco_cache import read_meta

__all__ = ["CachedCocoDataset"]


class CachedCocoDataset(Dataset):
    """The images of a COCO cache as Detectron2 dataset dicts, sorted by image id.

    ``dataset[i]`` is ``{"file_name": <image_root>/<file_name>, "height", "width", "image_id",
    "annotations": [{"bbox": [x, y, w, h] absolute pixels, "bbox_mode": BoxMode.XYWH_ABS,
    "category_id": contiguous id, "iscrowd": 0 or 1 when the json gives it, "segmentation":
    polygons or RLE when the json has a usable one}, ...]}``.

    Args:
        folder: a cache folder (:func:`dino_d2.data.coco_cache.ensure_cache`).
        image_root: the folder the json's ``file_name`` entries are relative to.
        filter_empty: keep only the images with a box that is not a crowd (as Detectron2's
            ``filter_empty``).
    """

    def __init__(self, folder: str, image_root: str, *, filter_empty: bool = False):
        self.folder = folder
        self.image_root = image_root
        self.filter_empty = filter_empty
        meta = read_meta(folder)
        self._length = len(self._map("nonempty")) if filter_empty else meta["num_images"]

    def _map(self, name: str) -> np.ndarray:
        maps = self.__dict__.setdefault("_maps", {})
        if name not in maps:
            mapped = np.load(os.path.join(self.folder, f"{name}.npy"), mmap_mode="r")
            # A plain ndarray view of the memmap (which it keeps open): slicing a np.memmap
            # costs more than the rest of a record.
            maps[name] = mapped.view(np.ndarray)
        return maps[name]

    def maps(self) -> Dict[str, np.ndarray]:
        """Every array of the cache, memory-mapped read-only (see :mod:`.coco_cache`)."""
        names = sorted(n[: -len(".npy")] for n in os.listdir(self.folder) if n.endswith(".npy"))
        return {name: self._map(name) for name in names}

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state.pop("_maps", None)
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Dict:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} images")
        index = int(index) % self._length
        row = int(self._map("nonempty")[index]) if self.filter_empty else index
        start, end = self._map("name_offsets")[row : row + 2]
        file_name = self._map("names")[start:end].tobytes().decode("utf-8", "surrogatepass")
        first, last = (int(v) for v in self._map("box_offsets")[row : row + 2])
        boxes = self._map("boxes")[first:last].tolist()
        classes = self._map("classes")[first:last].tolist()
        crowd = self._map("crowd")[first:last].tolist()
        bounds = self._map("segment_offsets")[first : last + 1].tolist()
        segments = self._map("segments")
        annotations = []
        for j, (box, category, iscrowd) in enumerate(zip(boxes, classes, crowd)):
            annotation = {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category}
            if iscrowd >= 0:
                annotation["iscrowd"] = iscrowd
            if bounds[j + 1] > bounds[j]:
                encoded = segments[bounds[j] : bounds[j + 1]].tobytes()
                annotation["segmentation"] = json.loads(encoded)
            annotations.append(annotation)
        return {
            "file_name": os.path.join(self.image_root, file_name),
            "height": self._map("heights")[row].item(),
            "width": self._map("widths")[row].item(),
            "image_id": int(self._map("image_ids")[row]),
            "annotations": annotations,
        }
