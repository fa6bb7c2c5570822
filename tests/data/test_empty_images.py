"""Images without annotations: filtered from training as the config says, or kept and mapped."""

import json

import numpy as np
import pytest
from PIL import Image

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.data import register_coco_format_dataset
from dino_d2.model_zoo import get_config

NAME = "test_empty_images"


@pytest.fixture
def dataset(tmp_path):
    for name in ("full.png", "empty.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name)
    coco = {
        "images": [
            {"id": 1, "file_name": "full.png", "height": 32, "width": 32},
            {"id": 2, "file_name": "empty.png", "height": 32, "width": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 9, 9], "area": 81}
        ],
        "categories": [{"id": 5, "name": "thing"}],
    }
    (tmp_path / "empty.json").write_text(json.dumps(coco))
    register_coco_format_dataset(NAME, str(tmp_path / "empty.json"), str(tmp_path))
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def test_config_filters_empty_images_unless_told_not_to(dataset):
    cfg = get_config("dino_r50_4scale_12ep.py")
    cfg.dataloader.train.dataset.names = dataset
    assert [d["image_id"] for d in instantiate(cfg.dataloader.train.dataset)] == [1]
    cfg.dataloader.train.dataset.filter_empty = False
    dicts = instantiate(cfg.dataloader.train.dataset)
    assert [d["image_id"] for d in dicts] == [1, 2]
    cfg.dataloader.train.mapper.augmentations = []
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert mapper.dataset_name == dataset
    mapped = mapper(dicts[1])
    assert len(mapped["instances"]) == 0 and tuple(mapped["image"].shape) == (3, 32, 32)
