"""model.num_classes against the datasets' categories (non-contiguous category ids included)."""

import json

import pytest
from omegaconf import OmegaConf

from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.data import register_coco_format_dataset
from dino_d2.data import check_num_classes


@pytest.fixture
def sparse_ids_dataset(tmp_path):
    """A COCO json whose category ids are 3, 7 and 12."""
    categories = [{"id": i, "name": n} for i, n in [(12, "cat"), (3, "ant"), (7, "bee")]]
    images = [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}]
    annotations = [
        {"id": k + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 4, 4], "area": 16}
        for k, c in enumerate([3, 7, 12])
    ]
    path = tmp_path / "sparse.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    name = "test_num_classes_sparse"
    register_coco_format_dataset(name, str(path), str(tmp_path))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _cfg(name, num_classes):
    return OmegaConf.create(
        {
            "model": {"num_classes": num_classes},
            "dataloader": {"train": {"dataset": {"names": name}}},
        }
    )


def test_non_contiguous_ids_map_to_0_to_k_minus_1(sparse_ids_dataset):
    (record,) = DatasetCatalog.get(sparse_ids_dataset)
    assert [a["category_id"] for a in record["annotations"]] == [0, 1, 2]
    check_num_classes(_cfg(sparse_ids_dataset, 3))


def test_num_classes_mismatch_says_which_and_how_to_fix(sparse_ids_dataset):
    with pytest.raises(ValueError) as error:
        check_num_classes(_cfg(sparse_ids_dataset, 80))
    message = str(error.value)
    assert "model.num_classes=80" in message and f"'{sparse_ids_dataset}' has 3" in message
    assert "['ant', 'bee', 'cat']" in message and "Set model.num_classes=3" in message
