"""The one place that knows how Detectron2 v0.6 (PyPI) and Detectron2 main differ.

Every difference is detected by looking for the feature, never by comparing version strings
(main still reports ``0.6``). What differs, and what this module does about it:

* ``engine.launch``: v0.6's worker asserts CUDA and always uses NCCL; main uses Gloo without a
  GPU. :func:`dino_d2.engine.launch` runs one process per GPU with NCCL, or that many CPU
  processes with Gloo, on both. v0.6 keeps the per-machine process group in
  ``comm._LOCAL_PROCESS_GROUP``, which its launcher fills in; main creates it with
  ``comm.create_local_process_group``. See :func:`create_local_process_group`.
* ``detectron2._C``: the PyPI v0.6 wheel ships an empty extension, so the fast COCO evaluation
  (``COCOeval_opt``) fails when it runs and ``collect_env_info`` raises. Main falls back to the
  slow evaluation by itself but has the same ``collect_env_info`` problem with an empty ``_C``.
  See :func:`fast_coco_eval_available` and :func:`collect_env_info`.
* ``SimpleTrainer``: main calls ``after_backward`` on its hooks between the backward pass and the
  optimizer step; v0.6 has no such hook stage. See :func:`run_after_backward_hooks`.
* ``AMPTrainer``: v0.6 takes ``(model, data_loader, optimizer, grad_scaler=None)``, main adds
  ``precision``, ``log_grad_scaler``, ``gather_metric_period``, ... but both assert CUDA in
  ``run_step``, so dino_d2's trainer implements mixed precision itself and uses neither.
* ``ImageList.from_tensors``: only main takes ``padding_constraints`` (``size_divisibility``,
  ``square_size``). See :func:`image_list_from_tensors`.
* ``build_detection_test_loader``: only main takes ``batch_size`` (v0.6 always batches one
  image). See :func:`build_detection_test_loader`.
* ``MapDataset``: when a mapper returns None (an image to skip), v0.6 picks another image with
  ``random.sample`` of a set, a TypeError since Python 3.11; main samples from a list. Both keep
  a set of every index in each process (about 117 MiB at Objects365's 1.74M images). See
  :func:`build_detection_train_loader`.
* Checkpoint writing (``DetectionCheckpointer.save`` / ``tag_last_checkpoint``) is fvcore's
  ``Checkpointer`` on both, with the same signatures, so
  :class:`dino_d2.checkpoint.AtomicCheckpointer` needs nothing here. (Main's ``load`` also
  accepts ``?query`` options in the path; dino_d2 does not override ``load``.)
* ``comm.all_gather``/``gather``: v0.6 serializes through ``torch.ByteStorage`` (works with
  current PyTorch, with a TypedStorage deprecation warning); main uses ``all_gather_object``.
* ViTDet's ``ViT`` and ``SimpleFeaturePyramid`` (``detectron2.modeling.backbone.vit``) exist on
  main only. :data:`ViT` and :data:`SimpleFeaturePyramid` here are Detectron2's classes on main
  and, on v0.6, stand-ins that raise an ImportError saying what is missing and how to get it when
  a config builds them (see :func:`detectron2_has_vitdet`). Main's ``SimpleFeaturePyramid``
  spells its padding key ``size_divisiblity``, which main's own ``from_tensors`` ignores;
  :func:`image_list_from_tensors` reads it as ``size_divisibility``.
"""

import functools
import importlib
import importlib.util
import logging
import os
import random
import sys
from importlib import metadata
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from detectron2.data.common import DatasetFromList
from detectron2.structures import ImageList
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper

__all__ = [
    "create_local_process_group",
    "fast_coco_eval_available",
    "collect_env_info",
    "run_after_backward_hooks",
    "image_list_from_tensors",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "detectron2_has_vitdet",
    "ViT",
    "SimpleFeaturePyramid",
]

logger = logging.getLogger(__name__)


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Creates Detectron2's process group of the ranks on this machine (a collective call).

    Must be called by every process after ``torch.distributed.init_process_group``.
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_workers_per_machine)
        return
    # v0.6: its launcher fills in the module attribute itself; do the same.
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("Detectron2's local process group exists already")
    world_size = dist.get_world_size()
    if world_size % num_workers_per_machine:
        raise ValueError(f"world size {world_size} is not a multiple of {num_workers_per_machine}")
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(world_size // num_workers_per_machine):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@functools.lru_cache(maxsize=None)
def _detectron2_extension():
    try:
        return importlib.import_module("detectron2._C")
    except ImportError:
        return None


def fast_coco_eval_available() -> bool:
    """Whether Detectron2's compiled COCO evaluation (``COCOeval_opt``) can run.

    When False, build ``COCOEvaluator(..., use_fast_impl=False)``: v0.6 would otherwise fail at
    the end of the evaluation (main falls back by itself).
    """
    extension = _detectron2_extension()
    return extension is not None and all(
        hasattr(extension, name)
        for name in ("COCOevalEvaluateImages", "COCOevalAccumulate", "InstanceAnnotation")
    )


def collect_env_info() -> str:
    """Detectron2's environment table, or a shorter one when ``detectron2._C`` is empty.

    Detectron2's ``collect_env_info`` asks the compiled extension for its compiler versions
    and raises when the extension has none (the PyPI v0.6 wheel).
    """
    extension = _detectron2_extension()
    if extension is not None and hasattr(extension, "get_compiler_version"):
        from detectron2.utils.collect_env import collect_env_info as detectron2_env_info

        return detectron2_env_info()
    from tabulate import tabulate

    import detectron2

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", "")),
        ("detectron2", f"{detectron2.__version__} @{os.path.dirname(detectron2.__file__)}"),
        ("detectron2._C", "missing or empty (no compiled Detectron2 ops)"),
        ("PyTorch", f"{torch.__version__} @{os.path.dirname(torch.__file__)}"),
        ("CUDA available", torch.cuda.is_available()),
    ]
    if torch.cuda.is_available():
        rows.append(("GPU 0", torch.cuda.get_device_name(0)))
        rows.append(("GPU count", torch.cuda.device_count()))
    for name in ("torchvision", "numpy", "fvcore", "iopath", "timm", "pycocotools"):
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not found"))
    rows.append(("CPU threads", torch.get_num_threads()))
    return tabulate(rows)


def run_after_backward_hooks(trainer) -> None:
    """Calls the trainer's ``after_backward`` hook stage where Detectron2 has one (main)."""
    after_backward = getattr(trainer, "after_backward", None)
    if after_backward is not None:
        after_backward()


def image_list_from_tensors(
    tensors: List[torch.Tensor],
    size_divisibility: int = 0,
    pad_value: float = 0.0,
    padding_constraints: Optional[Dict[str, int]] = None,
) -> ImageList:
    """``ImageList.from_tensors`` with main's ``padding_constraints`` on both versions.

    Args:
        tensors: images, each (C, H_i, W_i) (or (H_i, W_i)).
        size_divisibility: pad height and width to multiples of this.
        pad_value: value of the padding.
        padding_constraints: optional ``{"size_divisibility": int, "square_size": int}``; its
            size_divisibility overrides the argument, a positive square_size pads every image to
            a ``square_size`` square (before the divisibility rounding). The key
            ``size_divisiblity`` (main's ``SimpleFeaturePyramid``) counts as size_divisibility.
    """
    if padding_constraints and "size_divisiblity" in padding_constraints:
        padding_constraints = dict(padding_constraints)
        misspelled = padding_constraints.pop("size_divisiblity")
        padding_constraints.setdefault("size_divisibility", misspelled)
    if "padding_constraints" in _from_tensors_parameters():
        return ImageList.from_tensors(
            tensors, size_divisibility, pad_value, padding_constraints=padding_constraints
        )
    constraints = padding_constraints or {}
    size_divisibility = constraints.get("size_divisibility", size_divisibility)
    square_size = constraints.get("square_size", 0)
    images = ImageList.from_tensors(tensors, size_divisibility, pad_value)
    if square_size <= 0:
        return images
    side = square_size
    if size_divisibility > 1:
        side = -(-side // size_divisibility) * size_divisibility
    height, width = images.tensor.shape[-2:]
    if height > side or width > side:
        raise ValueError(f"images of {height}x{width} do not fit a {square_size} square")
    padded = F.pad(images.tensor, (0, side - width, 0, side - height), value=pad_value)
    return ImageList(padded, images.image_sizes)


@functools.lru_cache(maxsize=None)
def _from_tensors_parameters():
    import inspect

    return tuple(inspect.signature(ImageList.from_tensors).parameters)


def build_detection_test_loader(
    dataset,
    *,
    mapper: Optional[Callable] = None,
    sampler=None,
    batch_size: int = 1,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
):
    """Detectron2's ``build_detection_test_loader`` with main's ``batch_size`` on both versions.

    Args:
        dataset: a list of dataset dicts or a torch Dataset.
        mapper: maps a dataset dict to the model's input; None uses the dataset as it is.
        sampler: defaults to Detectron2's ``InferenceSampler`` (each worker gets its share).
        batch_size: images per batch (per process).
        num_workers: data-loading processes.
        collate_fn: defaults to returning the list of mapped dicts.
    """
    from detectron2.data import build

    kwargs = dict(mapper=mapper, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn)
    if "batch_size" in _test_loader_parameters():
        return build.build_detection_test_loader(dataset, batch_size=batch_size, **kwargs)
    from detectron2.data.common import DatasetFromList, MapDataset
    from detectron2.data.samplers import InferenceSampler

    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    if mapper is not None:
        dataset = MapDataset(dataset, mapper)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if sampler is not None:
            raise ValueError("an iterable dataset takes no sampler")
    elif sampler is None:
        sampler = InferenceSampler(len(dataset))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=build.trivial_batch_collator if collate_fn is None else collate_fn,
    )


@functools.lru_cache(maxsize=None)
def _test_loader_parameters():
    import inspect

    from detectron2.data import build

    return tuple(inspect.signature(build.build_detection_test_loader).parameters)


def build_detection_train_loader(dataset, *, mapper: Optional[Callable], **kwargs):
    """Detectron2's ``build_detection_train_loader`` (same arguments), whose mapper may return
    None to skip an image on both versions.

    A map-style dataset is mapped here by :class:`_SkippingMapDataset` (which can pick another
    image on both versions and whose memory does not grow with the dataset) and handed over
    already mapped.
    """
    from detectron2.data import build

    if mapper is not None:
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        if not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset, mapper = _SkippingMapDataset(dataset, mapper), None
    return build.build_detection_train_loader(dataset, mapper=mapper, **kwargs)


class _SkippingMapDataset(torch.utils.data.Dataset):
    """A map-style dataset mapped by ``map_func``; an element it maps to None (an image to skip)
    is replaced by another one drawn at random, as by Detectron2's ``MapDataset``.

    Only the indices skipped so far are remembered (Detectron2 keeps a set of every index in
    each process), so the memory does not grow with the dataset.
    """

    def __init__(self, dataset, map_func: Callable):
        self._dataset = dataset
        self._map_func = PicklableWrapper(map_func)
        self._rng = random.Random(42)
        self._skipped = set()

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, idx):
        index, size = int(idx), len(self._dataset)
        for attempt in range(1, size + 1):
            data = self._map_func(self._dataset[index])
            if data is not None:
                self._skipped.discard(index)
                return data
            self._skipped.add(index)
            if len(self._skipped) >= size:
                break
            if attempt == 3:
                logger.warning(f"Failed to map element {idx} after {attempt} attempts")
            index = self._draw_unskipped(size)
        raise RuntimeError("the mapper skipped every element of the dataset")

    def _draw_unskipped(self, size: int) -> int:
        """A uniformly drawn index that has not been skipped (at least one is left)."""
        if 2 * len(self._skipped) < size:
            while True:  # accepted with probability > 1/2 per draw
                index = self._rng.randrange(size)
                if index not in self._skipped:
                    return index
        return self._rng.choice([i for i in range(size) if i not in self._skipped])


_VITDET_MODULE = "detectron2.modeling.backbone.vit"


@functools.lru_cache(maxsize=None)
def detectron2_has_vitdet() -> bool:
    """Whether the installed Detectron2 has ViTDet's ``ViT`` and ``SimpleFeaturePyramid`` (main)."""
    return importlib.util.find_spec(_VITDET_MODULE) is not None


def _vitdet_missing(name: str) -> ImportError:
    import detectron2

    distributions = metadata.packages_distributions().get("detectron2") or ["detectron2"]
    return ImportError(
        f"{name} ({_VITDET_MODULE}.{name}) is missing from the installed Detectron2 "
        f"{detectron2.__version__} at {os.path.dirname(detectron2.__file__)}: ViTDet's ViT and "
        "SimpleFeaturePyramid are only in Detectron2 main, not in the v0.6 release. Install "
        f"Detectron2 from its git source instead: pip uninstall {' '.join(distributions)}, then "
        "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
        "(python tools/install_detectron2.py does the same when GitHub is reachable). "
        "configs/dino_timm_vit_small_4scale_12ep.py builds a ViT with a simple feature pyramid "
        "on any Detectron2."
    )


if detectron2_has_vitdet():
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
else:

    def ViT(*args, **kwargs):
        """Stand-in for Detectron2 main's ``ViT``; building it raises an explanatory ImportError."""
        raise _vitdet_missing("ViT")

    def SimpleFeaturePyramid(*args, **kwargs):
        """Stand-in for Detectron2 main's ``SimpleFeaturePyramid``; building it raises an
        explanatory ImportError."""
        raise _vitdet_missing("SimpleFeaturePyramid")
