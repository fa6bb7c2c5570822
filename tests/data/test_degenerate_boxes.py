"""Degenerate boxes in a COCO json: counted and logged once per dataset, dropped by the mapper."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from dino_d2.data import DatasetMapper, register_coco_format_dataset

NAME = "test_degenerate_boxes"


@pytest.fixture
def dataset(tmp_path):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    boxes = [
        [2, 3, 18, 27],  # good
        [40, 30, 40, 60],  # partly outside: clipped
        [5, 5, 0, 15],  # empty
        [30, 30, -10, 5],  # empty
        [float("nan"), 1, 9, 9],  # non-finite
        [60, 50, 10, 10],  # outside the image
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 1, "iscrowd": 0}
            for k, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    # NaN is not JSON: only the json path (Python's json) reads it; the cache refuses the file.
    register_coco_format_dataset(NAME, str(tmp_path / "boxes.json"), str(tmp_path), cache=False)
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def test_counted_and_logged_once_per_dataset_then_dropped_by_the_mapper(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        dicts = get_detection_dataset_dicts(dataset)
        get_detection_dataset_dicts(dataset)
    warnings = [r.getMessage() for r in caplog.records if "degenerate boxes" in r.getMessage()]
    assert len(warnings) == 1
    assert f"'{dataset}'" in warnings[0]
    for part in ("2 empty", "1 non-finite", "1 outside the image", "1 partly outside"):
        assert part in warnings[0]
    mapper = DatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", dataset_name=dataset
    )
    instances = mapper(dicts[0])["instances"]
    np.testing.assert_array_equal(
        instances.gt_boxes.tensor.numpy(), [[2, 3, 20, 30], [40, 30, 50, 40]]
    )
