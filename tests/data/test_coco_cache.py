"""The memory-mapped cache of a COCO json: the same records as the json path, rebuilt when the
json changes, never read half-written, safe under concurrent builders, refusing image paths
outside the image folder, and a dataset that pickles small and reopens in workers."""

import json
import logging
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from dino_d2.data import CachedCocoDataset, CocoFormatError, register_coco_format_dataset
from dino_d2.data import coco_cache
from dino_d2.data.coco_cache import cache_folder, cache_key, ensure_cache, is_valid_cache
from dino_d2.data.coco_reader import ijson_backend
from dino_d2.data.datasets import get_detection_dataset

NAMES = ("test_coco_cache", "test_coco_cache_json")


@pytest.fixture(autouse=True)
def unregister():
    yield
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _text(annotations_first=True, extra_annotations=()):
    """A json with annotations before images, category ids 9, 2, 40 (not contiguous, not
    sorted), images listed out of id order, one image without boxes, one with only a crowd box,
    an annotation without iscrowd, one of an unknown image, non-integer box values."""
    images = [
        {"id": 30, "file_name": "patch1/c.jpg", "width": 64, "height": 48},
        {"id": 4, "file_name": "patch0/a.jpg", "width": 100, "height": 80},
        {"id": 17, "file_name": "patch0/é.jpg", "width": 33, "height": 21},
        {"id": 5, "file_name": "patch2/empty.jpg", "width": 10, "height": 10},
    ]
    boxes = [
        (30, 40, [1.5, 2.25, 10, 20.125], 0),
        (4, 9, [0, 0, 50, 40], 0),
        (17, 2, [3, 4, 5, 6], 1),
        (4, 2, [10.1, 11.3, 12.7, 0], None),
        (30, 9, [70, 40, 10, 10], 0),
        (999, 9, [1, 1, 1, 1], 0),
        (4, 40, [-5, -5, 20, 20], 1),
    ]
    annotations = []
    for k, (image, category, box, crowd) in enumerate(boxes):
        annotation = {"id": 100 - k, "image_id": image, "category_id": category, "bbox": box}
        if crowd is not None:
            annotation["iscrowd"] = crowd
        annotations.append(annotation)
    annotations += list(extra_annotations)
    categories = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 40, "name": "x"}]
    parts = [("annotations", annotations), ("images", images), ("categories", categories)]
    if not annotations_first:
        parts.reverse()
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in parts) + "}"


def _register_both(tmp_path, text, **kwargs):
    path = tmp_path / "instances.json"
    path.write_text(text)
    results = [
        register_coco_format_dataset(name, path, tmp_path, cache=cache, **kwargs)
        for name, cache in zip(NAMES, (True, False))
    ]
    assert results[0] == results[1]
    return str(path)


def _same_records(cached, listed):
    assert len(cached) == len(listed)
    for ours, theirs in zip(cached, listed):
        ours, theirs = dict(ours), dict(theirs)
        for record in (ours, theirs):
            boxes = [a.pop("bbox") for a in record["annotations"]]
            record["boxes"] = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(ours.pop("boxes"), theirs.pop("boxes"))
        assert ours == theirs
        assert [type(ours[k]) for k in ("height", "width")] == [
            type(theirs[k]) for k in ("height", "width")
        ]


@pytest.mark.parametrize("annotations_first", [True, False])
def test_cache_gives_the_json_paths_records(tmp_path, annotations_first):
    _register_both(tmp_path, _text(annotations_first))
    cached, listed = (DatasetCatalog.get(name) for name in NAMES)
    _same_records(cached, listed)
    assert [r["image_id"] for r in cached] == [4, 5, 17, 30]
    assert cached[2]["file_name"] == str(tmp_path / "patch0/é.jpg")
    assert [a["category_id"] for a in cached[0]["annotations"]] == [1, 0, 2]
    assert "iscrowd" not in cached[0]["annotations"][1]
    for key in ("thing_classes", "thing_dataset_id_to_contiguous_id"):
        assert MetadataCatalog.get(NAMES[0]).get(key) == MetadataCatalog.get(NAMES[1]).get(key)
    assert MetadataCatalog.get(NAMES[0]).thing_dataset_id_to_contiguous_id == {2: 0, 9: 1, 40: 2}


def test_filter_empty_and_the_loaders_dataset(tmp_path):
    _register_both(tmp_path, _text())
    dataset = get_detection_dataset(NAMES[0])
    assert isinstance(dataset, CachedCocoDataset)
    # Image 5 has no box, image 17 only a crowd box: Detectron2's filter_empty drops both.
    _same_records([dataset[i] for i in range(len(dataset))], get_detection_dataset_dicts(NAMES[1]))
    assert len(dataset) == 2 and dataset[-1]["image_id"] == 30
    with pytest.raises(IndexError):
        dataset[2]
    unfiltered = get_detection_dataset(NAMES[0], filter_empty=False)
    assert len(unfiltered) == 4
    assert isinstance(get_detection_dataset(NAMES[1]), list)
    both = get_detection_dataset([NAMES[0], NAMES[0]], filter_empty=False)
    assert len(both) == 8 and both[5]["image_id"] == 5


def test_skipping_and_repeated_ids_as_the_json_path(tmp_path, caplog):
    extra = [
        {"id": 99, "image_id": 4, "category_id": 2, "bbox": [1, 1, 2, 2]},  # repeats 99
        {"id": 7, "image_id": 4, "category_id": 3, "bbox": [1, 1, 2, 2]},  # unknown category
        {"id": 7, "image_id": 4, "category_id": 2, "bbox": [1, 1, 2, 2]},  # 7 not yet accepted
        {"id": 8, "image_id": 4, "category_id": 2, "bbox": "1,1,2,2"},
    ]
    with caplog.at_level(logging.WARNING):
        path = _register_both(tmp_path, _text(extra_annotations=extra), skip_bad_annotations=True)
        cached, listed = (DatasetCatalog.get(name) for name in NAMES)
    _same_records(cached, listed)
    warnings = [r.getMessage() for r in caplog.records if "malformed annotations" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0] == warnings[1].replace(NAMES[1], NAMES[0])
    assert "3 malformed annotations skipped (1 with a bad 'bbox', 1 with a bad " in warnings[0]
    assert "1 annotation dropped: the image_id is not among the images" in warnings[0]
    with pytest.raises(CocoFormatError, match=r"annotation id 99 \(annotations\[7\]\): 'id'"):
        register_coco_format_dataset(NAMES[0], path, tmp_path)


def test_a_changed_json_is_converted_again(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(_text())
    register_coco_format_dataset(NAMES[0], path, tmp_path)
    first = MetadataCatalog.get(NAMES[0]).coco_cache
    assert len(DatasetCatalog.get(NAMES[0])) == 4
    content = json.loads(_text())
    content["images"] = content["images"][:2]
    path.write_text(json.dumps(content))
    register_coco_format_dataset(NAMES[0], path, tmp_path)
    second = MetadataCatalog.get(NAMES[0]).coco_cache
    assert second != first and not os.path.exists(first)
    assert len(DatasetCatalog.get(NAMES[0])) == 2
    # Touching the file alone makes a new key, too.
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1000))
    assert ensure_cache(str(path)) != second


def _break(folder, how):
    if how == "missing file":
        os.remove(os.path.join(folder, "boxes.npy"))
        return
    meta = json.loads(open(os.path.join(folder, "meta.json")).read())
    meta["version" if how == "wrong version" else "key"] = "other"
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("how", ["missing file", "wrong version", "wrong key"])
def test_an_incomplete_or_foreign_cache_is_rebuilt(tmp_path, how):
    path = str(tmp_path / "instances.json")
    (tmp_path / "instances.json").write_text(_text())
    folder = ensure_cache(path)
    _break(folder, how)
    assert not is_valid_cache(folder, cache_key(path))
    assert ensure_cache(path) == folder and is_valid_cache(folder, cache_key(path))
    assert len(CachedCocoDataset(folder, str(tmp_path))) == 4


def test_a_killed_builds_temporary_folder_is_never_read(tmp_path):
    path = str(tmp_path / "instances.json")
    (tmp_path / "instances.json").write_text(_text())
    parent, key = cache_folder(path), cache_key(path)
    left = os.path.join(parent, f".tmp-{key}-killed")
    os.makedirs(left)
    with open(os.path.join(left, "meta.json"), "w") as f:
        json.dump({"version": coco_cache.CACHE_VERSION, "key": key}, f)
    old = os.path.join(parent, ".tmp-v0-killed-yesterday")
    os.makedirs(old)
    os.utime(old, (0, os.stat(old).st_mtime - 2 * 24 * 3600))
    folder = ensure_cache(path)
    assert folder == os.path.join(parent, key) and is_valid_cache(folder, key)
    assert len(CachedCocoDataset(folder, str(tmp_path))) == 4
    # A recent one may be a build in progress elsewhere: kept; one from days ago is removed.
    assert os.path.isdir(left) and not os.path.exists(old)


def _build(path, queue):
    queue.put(ensure_cache(path))


def test_concurrent_builders_and_a_lost_rename_race(tmp_path):
    path = str(tmp_path / "instances.json")
    (tmp_path / "instances.json").write_text(_text())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    builders = [context.Process(target=_build, args=(path, queue)) for _ in range(3)]
    for builder in builders:
        builder.start()
    folders = {queue.get(timeout=120) for _ in builders}
    for builder in builders:
        builder.join(timeout=120)
        assert builder.exitcode == 0
    (folder,) = folders
    assert [n for n in os.listdir(cache_folder(path)) if not n.startswith(".lock")] == [
        os.path.basename(folder)
    ]
    # A builder elsewhere (no shared lock) finishing second keeps the first cache.
    other = os.path.join(cache_folder(path), ".tmp-other")
    os.makedirs(other)
    coco_cache.build_cache(path, other, cache_key(path))
    coco_cache._move_into_place(other, folder, cache_key(path))
    assert is_valid_cache(folder, cache_key(path)) and os.path.isdir(other)


def test_a_read_only_json_folder_caches_under_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(coco_cache.CACHE_ENV, str(tmp_path / "caches"))
    monkeypatch.setattr(coco_cache.os, "access", lambda path, mode: False)
    path = str(tmp_path / "instances.json")
    assert cache_folder(path).startswith(str(tmp_path / "caches" / "instances.json-"))


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "json"])
@pytest.mark.parametrize("file_name", ["../../etc/x.jpg", "/abs/x.jpg", "a/../../x.jpg"])
def test_images_outside_the_image_folder(tmp_path, caplog, cache, file_name):
    content = json.loads(_text())
    content["images"][2]["file_name"] = file_name
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CocoFormatError) as error:
        register_coco_format_dataset(NAMES[0], path, tmp_path, cache=cache)
    assert str(error.value).startswith(
        f"{path} (dataset '{NAMES[0]}'): image id 17: {file_name!r} points outside the image "
        f"folder {tmp_path} (1 image in all)"
    )
    assert "dataset.allow_images_outside_root=True" in str(error.value)
    with caplog.at_level(logging.WARNING):
        register_coco_format_dataset(
            NAMES[0], path, tmp_path, cache=cache, allow_images_outside_root=True
        )
        records = DatasetCatalog.get(NAMES[0])
        DatasetCatalog.get(NAMES[0])
    warnings = [
        r.getMessage() for r in caplog.records if "outside the image folder" in r.getMessage()
    ]
    assert len(warnings) == 1 and f"image id 17: {file_name!r}" in warnings[0]
    assert records[2]["file_name"] == os.path.join(str(tmp_path), file_name)


def test_degenerate_boxes_counted_once_on_the_cache(tmp_path, caplog):
    _register_both(tmp_path, _text())
    with caplog.at_level(logging.WARNING):
        for name in NAMES:
            get_detection_dataset(name)
            get_detection_dataset(name)
    warnings = [r.getMessage() for r in caplog.records if "degenerate boxes" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0] == warnings[1].replace(NAMES[1], NAMES[0])
    assert "1 empty, 1 outside the image, 1 partly outside the image (clipped)" in warnings[0]


def test_nan_is_not_json_for_the_cache(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(_text().replace("[0, 0, 50, 40]", "[NaN, 0, 50, 40]"))
    with pytest.raises(CocoFormatError, match="line 1, column") as error:
        register_coco_format_dataset(NAMES[0], path, tmp_path)
    assert "NaN and Infinity are not JSON" in str(error.value) and "dataset.cache=False" in (
        str(error.value)
    )
    assert register_coco_format_dataset(NAMES[0], path, tmp_path, cache=False) == 3


def test_the_dataset_pickles_small_and_reopens_in_workers(tmp_path):
    _register_both(tmp_path, _text())
    dataset = get_detection_dataset(NAMES[0], filter_empty=False)
    expected = [dataset[i] for i in range(len(dataset))]
    state = pickle.dumps(dataset)
    assert len(state) < 1000 and b"patch0" not in state
    copy = pickle.loads(state)
    assert "_maps" not in vars(copy)  # what a spawned worker gets: the maps reopen lazily
    assert [copy[i] for i in range(len(dataset))] == expected
    loader = torch.utils.data.DataLoader(copy, batch_size=None, num_workers=2)
    assert list(loader) == expected


def test_the_c_backend_of_ijson_is_used():
    assert ijson_backend().backend_name == "yajl2_c"
