"""Objects365 v1/v2 registration from fake published layouts (tiny jsons, no image files)."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.data import Objects365LayoutError, register_builtin_datasets
from dino_d2.data.objects365 import OBJECTS365_DATASETS, objects365_files
from dino_d2.data.objects365_classes import (
    OBJECTS365_CLASSES as CLASSES,
    OBJECTS365_V1_CLASSES,
    OBJECTS365_V2_CLASSES,
)


@pytest.fixture(autouse=True)
def unregistered():
    """Each test starts and ends without the Objects365 names registered."""

    def clear():
        for name in OBJECTS365_DATASETS:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    clear()
    yield
    clear()


def _write_split(root, name, *, names=None):
    """A json with the version's 365 categories listed in reverse id order (as the v1 jsons
    list theirs out of order) and two images with one box each; folders without images."""
    version = name.split("_")[1]
    names = CLASSES[version] if names is None else names
    json_file, image_root = objects365_files(name, root)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    os.makedirs(os.path.join(image_root, "images") if version == "v2" else image_root)
    prefix = "images/v1/patch0/" if version == "v2" else ""
    content = {
        "images": [
            {"id": 7, "file_name": f"{prefix}a.jpg", "height": 40, "width": 60},
            {"id": 9, "file_name": f"{prefix}b.jpg", "height": 50, "width": 30},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [1, 2, 10, 20],
                "iscrowd": 0,
                "area": 200,
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": len(names),
                "bbox": [0, 0, 5, 5],
                "iscrowd": 0,
                "area": 25,
            },
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in reversed(list(enumerate(names)))],
    }
    with open(json_file, "w") as f:
        json.dump(content, f)
    return json_file, image_root


@pytest.mark.parametrize("name", sorted(OBJECTS365_DATASETS))
def test_registration_finds_the_published_layout(tmp_path, name):
    version = name.split("_")[1]
    json_file, image_root = _write_split(tmp_path, name)
    assert register_builtin_datasets([name], root=str(tmp_path)) == [name]
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == list(CLASSES[version])
    assert len(metadata.thing_classes) == 365
    assert metadata.json_file == json_file and metadata.evaluator_type == "coco"
    dicts = DatasetCatalog.get(name)
    assert [os.path.relpath(d["file_name"], image_root) for d in dicts] == (
        ["images/v1/patch0/a.jpg", "images/v1/patch0/b.jpg"]
        if version == "v2"
        else ["a.jpg", "b.jpg"]
    )
    # Category id k is contiguous class k - 1: the published lists are in id order.
    assert [d["annotations"][0]["category_id"] for d in dicts] == [2, 364]


def test_registration_reads_detectron2_datasets(tmp_path, monkeypatch):
    _write_split(tmp_path, "objects365_v2_val")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert register_builtin_datasets(["objects365_v2_val", "coco_2017_val"]) == [
        "objects365_v2_val"
    ]
    assert "objects365_v2_train" not in DatasetCatalog.list()


def test_missing_folder_error_names_what_is_expected(tmp_path):
    with pytest.raises(Objects365LayoutError) as error:
        register_builtin_datasets(["objects365_v2_train"], root=str(tmp_path))
    message = str(error.value)
    base = os.path.join(str(tmp_path), "objects365", "v2", "train")
    for expected in ("zhiyuan_objv2_train.json", "images/"):
        assert os.path.join(base, expected) in message
    assert "objects365_v2_train" in message and "DETECTRON2_DATASETS" in message
    assert "objects365_v2_train" not in DatasetCatalog.list()


def test_v2_without_the_images_folder_is_refused(tmp_path):
    """mmdetection's flat train/patchN layout does not match the json's file names."""
    json_file, image_root = _write_split(tmp_path, "objects365_v2_val")
    os.rmdir(os.path.join(image_root, "images"))
    os.makedirs(os.path.join(image_root, "patch0"))
    with pytest.raises(Objects365LayoutError, match="Not found: .*val/images"):
        register_builtin_datasets(["objects365_v2_val"], root=str(tmp_path))


def test_v1_names_in_a_v2_folder_are_refused(tmp_path):
    _write_split(tmp_path, "objects365_v2_val", names=OBJECTS365_V1_CLASSES)
    with pytest.raises(
        ValueError, match="category 0 .* 'person' where the published list has 'Person'"
    ):
        register_builtin_datasets(["objects365_v2_val"], root=str(tmp_path))
    assert "objects365_v2_val" not in DatasetCatalog.list()


def test_a_missing_category_is_refused(tmp_path):
    _write_split(tmp_path, "objects365_v1_val", names=OBJECTS365_V1_CLASSES[:364])
    with pytest.raises(ValueError, match="364 categories instead of 365"):
        register_builtin_datasets(["objects365_v1_val"], root=str(tmp_path))


def test_published_lists_are_365_distinct_names():
    for names in CLASSES.values():
        assert len(names) == len(set(names)) == 365
    # The two versions share most names up to case, but not all (v2 renamed and replaced some).
    shared = {n.lower() for n in OBJECTS365_V1_CLASSES} & {n.lower() for n in OBJECTS365_V2_CLASSES}
    assert 200 < len(shared) < 365
