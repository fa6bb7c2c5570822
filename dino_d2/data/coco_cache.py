"""A COCO-format json converted once into memory-mapped columns: annotations of any size in
bounded memory.

The json is streamed (:func:`dino_d2.data.coco_reader.iter_entries`, one entry at a time) and
checked entry by entry with the checks of the json path (:mod:`dino_d2.data.coco_json`), so the
errors and warnings are the same. What is kept is written as numpy ``.npy`` files, read back with
``np.load(mmap_mode="r")``: every process of a machine maps the same pages (the page cache holds
them once), nothing is copied into a process, and a record is a few slices.

Layout of a cache folder (``N`` images sorted by id, ``M`` kept boxes grouped by image, in file
order within an image):

* ``image_ids`` ``(N,)`` int64; ``widths``, ``heights`` ``(N,)`` int64 (float64 when the json
  has a non-integer size); ``names`` ``(B,)`` uint8, the UTF-8 file names one after the other,
  image ``i``'s at ``names[name_offsets[i]:name_offsets[i + 1]]``;
* ``box_offsets`` ``(N + 1,)`` int64: image ``i``'s boxes are rows ``box_offsets[i]`` to
  ``box_offsets[i + 1]`` of ``boxes`` ``(M, 4)`` float32 absolute XYWH pixels, ``classes``
  ``(M,)`` int32 contiguous ids ``0..K-1`` (the json's category ids in increasing order, as
  Detectron2 maps them), ``crowd`` ``(M,)`` int8 (0 or 1; -1 when the annotation has no
  ``iscrowd``) and ``box_ids`` ``(M,)`` int64 (the annotation ids);
* ``segments`` ``(S,)`` uint8 and ``segment_offsets`` ``(M + 1,)`` int64: box ``j``'s
  ``segmentation`` as compact JSON (UTF-8) at ``segments[segment_offsets[j]:segment_offsets[j +
  1]]``, in the form the json path keeps (:func:`dino_d2.data.segmentation.usable_segmentation`:
  polygons, or RLE with ``str`` counts); an empty slice when the annotation has none (Objects365
  has none; COCO has polygons and, for crowds, RLE);
* ``nonempty`` ``(E,)`` int64: the images with at least one box that is not a crowd (what
  Detectron2's ``filter_empty`` keeps);
* ``meta.json``: the format version, the key, the categories, the problems found (skipped and
  unmatched annotations, images outside the image folder) and the degenerate boxes.

Numpy rather than Arrow: no new dependency, and ``np.load(mmap_mode="r")`` is zero-copy for
fixed-size columns, which is all a record needs.

Where: ``<json>.dino_d2-cache/<key>/`` beside the json, or, when the json's folder is not
writable, under ``$DINO_D2_CACHE`` (default ``~/.cache/dino_d2``). The key is the format version
with the json's size and modification time: a changed json gets a new folder, and the old one is
removed. A cache is built in a temporary folder (``.tmp-*``, never read; a killed build's is
removed a day later) and renamed into place, so a half-written cache is never read; builders on
one machine take turns on a file lock (the first builds, the others find its cache), and two
builders that do not share the lock (machines on a shared file system) both build and the second
rename loses harmlessly.

A cache is always built skipping malformed annotations (and counting them); a dataset registered
without skipping raises the error of the first one (:func:`raise_problems`).
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Optional

import numpy as np

from .coco_json import (
    AnnotationChecker,
    CocoProblems,
    check_categories,
    check_image,
    file_and_dataset,
    malformed_annotation_error,
    note_outside_root,
)
from .coco_reader import check_json_object, iter_entries
from .degenerate import degenerate_box_counts
from .segmentation import usable_segmentation

__all__ = [
    "CACHE_VERSION",
    "CACHE_ENV",
    "cache_folder",
    "cache_key",
    "ensure_cache",
    "build_cache",
    "is_valid_cache",
    "read_meta",
    "problems_of",
    "raise_problems",
]

logger = logging.getLogger(__name__)

# Version 2 added the segmentations (a version-1 cache is rebuilt: its key differs).
CACHE_VERSION = 2
CACHE_ENV = "DINO_D2_CACHE"
_SUFFIX = ".dino_d2-cache"
_ARRAYS = (
    "image_ids",
    "widths",
    "heights",
    "name_offsets",
    "names",
    "box_offsets",
    "boxes",
    "classes",
    "crowd",
    "box_ids",
    "segment_offsets",
    "segments",
    "nonempty",
)
_CHUNK = 1 << 16  # entries converted to numpy at a time
_STALE_S = 24 * 3600  # age of a temporary folder left by a killed build before it is removed


def cache_folder(json_file: str) -> str:
    """The folder holding the caches of ``json_file`` (one subfolder per key)."""
    json_file = os.path.abspath(json_file)
    if os.access(os.path.dirname(json_file), os.W_OK):
        return json_file + _SUFFIX
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dino_d2")
    digest = hashlib.sha1(json_file.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(root, f"{os.path.basename(json_file)}-{digest}{_SUFFIX}")


def cache_key(json_file: str) -> str:
    """``v<format version>-<size>-<mtime in ns>`` of the json: its cache's subfolder."""
    stat = os.stat(json_file)
    return f"v{CACHE_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"


def read_meta(folder: str) -> Dict:
    """A cache's ``meta.json``."""
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)


def is_valid_cache(folder: str, key: str) -> bool:
    """Whether ``folder`` is a complete cache of this format version for ``key``."""
    try:
        meta = read_meta(folder)
    except (OSError, ValueError):
        return False
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        return False
    return all(os.path.isfile(os.path.join(folder, f"{name}.npy")) for name in _ARRAYS)


@contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_cache(json_file: str, dataset_name: Optional[str] = None) -> str:
    """The cache folder of ``json_file``'s current content, built first if needed.

    Args:
        json_file: the COCO json.
        dataset_name: named in the errors.

    Returns:
        the folder of a valid cache (see the module docstring).

    Raises:
        CocoFormatError: the json is not JSON or has a malformed image or category entry.
    """
    json_file = os.path.abspath(json_file)
    parent = cache_folder(json_file)
    key = cache_key(json_file)
    final = os.path.join(parent, key)
    if is_valid_cache(final, key):
        return final
    os.makedirs(parent, exist_ok=True)
    with _locked(os.path.join(parent, ".lock")):
        if is_valid_cache(final, key):
            return final
        logger.info(
            f"Converting {json_file} into a memory-mapped cache at {final} (once; a large json "
            "takes minutes)"
        )
        start = time.perf_counter()
        building = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent)
        try:
            build_cache(json_file, building, key, dataset_name)
            _move_into_place(building, final, key)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        logger.info(f"Converted {json_file} in {time.perf_counter() - start:.1f} s")
        _remove_others(parent, key)
    return final


def _remove_others(parent: str, key: str) -> None:
    """Removes the caches of other keys, and the temporary folders of builds killed a day ago
    or more (younger ones may be another machine's build in progress)."""
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith((".tmp-", ".stale-")):
            try:
                stale = now - os.stat(path).st_mtime > _STALE_S
            except FileNotFoundError:
                continue
        else:
            stale = name != key and not name.startswith(".")
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(building: str, final: str, key: str) -> None:
    """Renames the cache built in ``building`` to ``final``, unless a builder elsewhere put a
    valid cache there first (then ``building`` is left for the caller to remove)."""
    if is_valid_cache(final, key):
        return
    if os.path.exists(final):  # an incomplete or foreign cache under this key
        stale = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(stale, "cache"))
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(building, final)
    except OSError:
        if not is_valid_cache(final, key):  # not a builder elsewhere that won the race
            raise


class _Chunked:
    """A column grown in chunks: Python values for the current chunk, numpy arrays before."""

    def __init__(self, dtype, width: int = 1):
        self.dtype, self.width = dtype, width
        self.chunks, self.values = [], []

    def extend(self, values) -> None:
        self.values.extend(values)
        if len(self.values) >= _CHUNK * self.width:
            self._flush()

    def _flush(self) -> None:
        if self.values:
            self.chunks.append(np.array(self.values, dtype=self.dtype))
            self.values = []

    def array(self) -> np.ndarray:
        self._flush()
        whole = np.concatenate(self.chunks) if self.chunks else np.zeros(0, self.dtype)
        self.chunks = []
        return whole.reshape(-1, self.width) if self.width > 1 else whole


class _RecordedIds:
    """``seen_ids`` for :class:`AnnotationChecker` that records the accepted ids in numpy and
    finds no repeats; :func:`_repeated_ids` checks them afterwards."""

    def __init__(self):
        self.ids = _Chunked(np.int64)

    def __contains__(self, annotation_id) -> bool:
        return False

    def add(self, annotation_id) -> None:
        self.ids.extend((annotation_id,))


def _has_repeated_ids(ids: np.ndarray) -> bool:
    ids = np.sort(ids)
    return bool((ids[1:] == ids[:-1]).any())


def _read_annotations(json_file, dataset_name, category_ids, image_ids, *, exact_repeats: bool):
    """Streams and checks the annotations; returns the problems and the kept columns.

    With ``exact_repeats=False`` repeated annotation ids are not looked for (a set of millions
    of ids would cost gigabytes); the caller checks the accepted ids with numpy and, if some
    repeat, reads again with ``exact_repeats=True`` (a Python set) to skip exactly those the json
    path skips.
    """
    problems = CocoProblems()
    recorded = None if exact_repeats else _RecordedIds()
    check = AnnotationChecker(
        file_and_dataset(json_file, dataset_name),
        category_ids,
        image_ids,
        problems,
        skip_bad_annotations=True,
        seen_ids=recorded,
    )
    ints, boxes, crowd = _Chunked(np.int64, 3), _Chunked(np.float32, 4), _Chunked(np.int8)
    segments, segment_lengths = bytearray(), []
    for index, annotation in enumerate(
        iter_entries(json_file, "annotations", dataset_name, required=False)
    ):
        if check(annotation, index):
            ints.extend((annotation["image_id"], annotation["category_id"], annotation["id"]))
            boxes.extend(annotation["bbox"])
            crowd.extend((annotation.get("iscrowd", -1),))
            segmentation = annotation.get("segmentation")
            if segmentation is not None:
                segmentation = usable_segmentation(segmentation)
            encoded = b"" if segmentation is None else _compact_json(segmentation)
            segments += encoded
            segment_lengths.append(len(encoded))
    repeats = recorded is not None and _has_repeated_ids(recorded.ids.array())
    columns = (ints.array(), boxes.array(), crowd.array(), segments, segment_lengths)
    return problems, repeats, columns


def _compact_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def build_cache(json_file: str, folder: str, key: str, dataset_name: Optional[str] = None) -> None:
    """Converts ``json_file`` into the cache layout (module docstring) in ``folder``.

    Memory: numpy columns of the kept boxes (57 bytes a box with the recorded annotation ids,
    about three times that while they are concatenated and sorted), the segmentations as one
    JSON blob (about twice its size while it is reordered; polygons are most of COCO's json) and the image ids as a Python set; never more than one of the json's entries as
    Python objects.

    Raises:
        CocoFormatError: the json is not JSON or has a malformed image or category entry.
    """
    where = file_and_dataset(json_file, dataset_name)
    check_json_object(json_file, dataset_name)
    categories = list(iter_entries(json_file, "categories", dataset_name, required=True))
    category_ids = check_categories(categories, where)
    image_problems = CocoProblems()
    image_ids, names, name_lengths = set(), bytearray(), []
    ids, sizes = _Chunked(np.int64), _Chunked(np.float64, 2)
    integral = True
    for index, image in enumerate(iter_entries(json_file, "images", dataset_name, required=True)):
        if check_image(image, index, image_ids, where):
            note_outside_root(image_problems, image)
        ids.extend((image["id"],))
        sizes.extend((image["width"], image["height"]))
        integral = integral and all(isinstance(image[k], int) for k in ("width", "height"))
        encoded = image["file_name"].encode("utf-8", "surrogatepass")
        names += encoded
        name_lengths.append(len(encoded))
    problems, repeats, columns = _read_annotations(
        json_file, dataset_name, category_ids, image_ids, exact_repeats=False
    )
    if repeats:
        problems, _, columns = _read_annotations(
            json_file, dataset_name, category_ids, image_ids, exact_repeats=True
        )
    ints, boxes, crowd, segments, segment_lengths = columns
    del columns
    del image_ids
    problems.outside_root = image_problems.outside_root
    problems.outside_examples = image_problems.outside_examples
    ids, sizes = ids.array(), sizes.array()
    order = np.argsort(ids, kind="stable")
    size_type = np.int64 if integral else np.float64
    arrays = {
        "image_ids": ids[order],
        "widths": sizes[order, 0].astype(size_type),
        "heights": sizes[order, 1].astype(size_type),
    }
    del ids, sizes
    arrays["names"], arrays["name_offsets"] = _reorder_blob(names, name_lengths, order)
    del names, name_lengths
    rows = np.searchsorted(arrays["image_ids"], ints[:, 0])
    box_order = np.argsort(rows, kind="stable")
    rows = rows[box_order]
    counts = np.bincount(rows, minlength=len(order))
    arrays["box_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sorted_categories = np.array(sorted(category_ids), dtype=np.int64)
    arrays["classes"] = np.searchsorted(sorted_categories, ints[box_order, 1]).astype(np.int32)
    arrays["box_ids"] = ints[box_order, 2]
    del ints
    arrays["boxes"] = boxes[box_order]
    arrays["crowd"] = crowd[box_order]
    del boxes, crowd
    arrays["segments"], arrays["segment_offsets"] = _reorder_blob(
        segments, segment_lengths, box_order
    )
    del segments, segment_lengths
    not_crowd = np.bincount(rows[arrays["crowd"] != 1], minlength=len(order))
    arrays["nonempty"] = np.flatnonzero(not_crowd).astype(np.int64)
    degenerate = degenerate_box_counts(
        arrays["boxes"], arrays["widths"][rows], arrays["heights"][rows]
    )
    for name, array in arrays.items():
        np.save(os.path.join(folder, f"{name}.npy"), array)
    by_id = {c["id"]: c["name"] for c in categories}
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "json_file": json_file,
        "num_images": len(order),
        "num_boxes": len(box_order),
        "categories": [{"id": i, "name": by_id[i]} for i in sorted(by_id)],
        "problems": {
            "skipped": dict(problems.skipped),
            "unmatched": problems.unmatched,
            "examples": problems.examples,
            "first_malformed": problems.first_malformed,
            "outside_root": problems.outside_root,
            "outside_examples": problems.outside_examples,
        },
        "degenerate": degenerate,
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def _reorder_blob(blob: bytearray, lengths: List[int], order: np.ndarray):
    """A blob of variable-length items (file names, segmentations) and its ``(N + 1,)``
    offsets, with the items in ``order``."""
    lengths = np.array(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    new_lengths = lengths[order]
    offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64)
    # Byte j of the new blob is byte j - offsets[i] + starts[order[i]] of the old one.
    shift = np.repeat(starts[order] - offsets[:-1], new_lengths)
    data = np.frombuffer(bytes(blob), dtype=np.uint8)
    return data[np.arange(int(offsets[-1]), dtype=np.int64) + shift], offsets


def problems_of(meta: Dict) -> CocoProblems:
    """The :class:`CocoProblems` a cache's ``meta.json`` recorded."""
    recorded = dict(meta["problems"])
    recorded["skipped"] = Counter(recorded["skipped"])
    return CocoProblems(**recorded)


def raise_problems(meta: Dict, json_file: str, dataset_name: str, *, skip: bool) -> None:
    """Raises the json path's error for the first malformed annotation unless ``skip``."""
    first = meta["problems"]["first_malformed"]
    if first and not skip:
        raise malformed_annotation_error(file_and_dataset(json_file, dataset_name), first)
