"""Segmentations through both loading paths: the json path and the memory-mapped cache give the
same polygons and RLE, in Detectron2's usable form, and a malformed one is named."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.data import CocoFormatError, register_coco_format_dataset
from dino_d2.data.segmentation import segmentation_problem, usable_segmentation

NAMES = ("test_segm_cache", "test_segm_json")


@pytest.fixture(autouse=True)
def unregister():
    yield
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _json(tmp_path, segmentations):
    """Image 2 (out of id order) holds one annotation per given segmentation (None: no key)."""
    annotations = []
    for k, segmentation in enumerate(segmentations):
        annotation = {"id": k + 1, "image_id": 2, "category_id": 7, "bbox": [1, 2, 5, 4]}
        if segmentation is not None:
            annotation["segmentation"] = segmentation
        annotations.append(annotation)
    annotations.append(
        {"id": 99, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2], "segmentation": []}
    )
    content = {
        "images": [
            {"id": 2, "file_name": "b.png", "width": 12, "height": 10},
            {"id": 1, "file_name": "a.png", "width": 12, "height": 10},
        ],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return path


def _load_both(tmp_path, segmentations):
    path = _json(tmp_path, segmentations)
    for name, cache in zip(NAMES, (True, False)):
        register_coco_format_dataset(name, path, tmp_path, cache=cache)
    return [DatasetCatalog.get(name) for name in NAMES]


def test_both_paths_carry_the_same_usable_segmentations(tmp_path):
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 1:6] = True
    mask[3:5, 2:4] = False  # a hole, which only RLE can express
    uncompressed = {"size": [10, 12], "counts": [24, 4, 6, 4, 6, 2, 2, 4, 6, 4, 58]}
    segmentations = [
        [[1.0, 2.0, 6.0, 2.0, 6.0, 6.0], [1, 1, 2, 1]],  # the second polygon is too short
        _rle(mask),
        uncompressed,
        [[1, 2, 3, 4]],  # no usable polygon: the box stays, without a segmentation
        None,
    ]
    cached, listed = _load_both(tmp_path, segmentations)
    assert [r["image_id"] for r in cached] == [r["image_id"] for r in listed] == [1, 2]
    for records in (cached, listed):
        assert "segmentation" not in records[0]["annotations"][0]  # an empty list: no mask
        got = [a.get("segmentation") for a in records[1]["annotations"]]
        assert got[0] == [[1.0, 2.0, 6.0, 2.0, 6.0, 6.0]]
        assert got[1] == _rle(mask)
        assert isinstance(got[2]["counts"], str)
        np.testing.assert_array_equal(
            mask_util.decode(got[2]), mask_util.decode(mask_util.frPyObjects(uncompressed, 10, 12))
        )
        assert got[3] is None and got[4] is None
        assert [a["bbox"] for a in records[1]["annotations"]] == [[1, 2, 5, 4]] * 5
    assert cached[1]["annotations"] == listed[1]["annotations"]


@pytest.mark.parametrize(
    "segmentation, named",
    [
        ("1,2,3", "polygons"),
        ([[1, 2, "3", 4, 5, 6]], "polygons"),
        ({"size": [10], "counts": "abc"}, "'size'"),
        ({"size": [10, 12], "counts": 5}, "'counts'"),
        ({"size": [10, 12], "counts": [1, -2]}, "'counts'"),
    ],
)
def test_malformed_segmentation_is_named_by_both_paths(tmp_path, segmentation, named):
    assert segmentation_problem(segmentation) is not None
    path = _json(tmp_path, [segmentation])
    for name, cache in zip(NAMES, (True, False)):
        with pytest.raises(CocoFormatError, match="annotation id 1") as error:
            register_coco_format_dataset(name, path, tmp_path, cache=cache)
        assert "'segmentation'" in str(error.value) and named in str(error.value)
        assert str(path) in str(error.value)


def test_usable_segmentation_is_detectron2s_form():
    assert segmentation_problem([]) is None and usable_segmentation([]) is None
    rle = usable_segmentation({"size": [2, 3], "counts": [1, 2, 3]})
    assert rle["size"] == [2, 3] and isinstance(rle["counts"], str)
    assert mask_util.decode(rle).sum() == 2
