import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from dino_d2.data import digits
from dino_d2.data.datasets import (
    default_datasets_root,
    register_coco_format_dataset,
    register_digits,
)
from dino_d2.data.digits import generate_digits_dataset


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("registration") / "digits"
    return generate_digits_dataset(root, num_train=4, num_val=3, seed=0, log_every=0)


@pytest.fixture
def names(request):
    """Unique dataset names for one test, unregistered afterwards."""
    prefix = f"test_data_{request.node.name}".replace("[", "_").replace("]", "")
    names = (f"{prefix}_train", f"{prefix}_val")
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_register_digits(digits_root, names):
    assert register_digits(digits_root, names=names) == names
    _, labels = digits._source_digits()
    for name, split, count in zip(names, ("train", "val"), (4, 3)):
        metadata = MetadataCatalog.get(name)
        assert metadata.evaluator_type == "coco"
        assert metadata.thing_classes == [str(d) for d in range(10)]
        assert metadata.json_file == os.path.join(digits_root, "annotations", f"{split}.json")
        assert metadata.image_root == os.path.join(digits_root, split)
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == count
        for record in dicts:
            assert os.path.isfile(record["file_name"])
            assert (record["height"], record["width"]) == (320, 320)
            assert 1 <= len(record["annotations"]) <= 6
        with open(metadata.json_file) as f:
            source = json.load(f)["annotations"]
        loaded = [a for record in dicts for a in record["annotations"]]
        assert len(loaded) == len(source)
        for annotation, original in zip(loaded, source):
            # Contiguous ids 0..9, equal to the digit.
            assert annotation["category_id"] == labels[original["digit_index"]]
            assert annotation["bbox_mode"] == BoxMode.XYWH_ABS
        # load_coco_json agrees with the metadata set at registration.
        assert metadata.thing_dataset_id_to_contiguous_id == {d + 1: d for d in range(10)}


def test_register_digits_twice_and_elsewhere(digits_root, names, tmp_path, caplog):
    register_digits(digits_root, names=names)
    register_digits(digits_root, names=names)
    assert len(DatasetCatalog.get(names[0])) == 4
    other = generate_digits_dataset(tmp_path / "other", num_train=2, num_val=1, log_every=0)
    with caplog.at_level(logging.WARNING, logger="dino_d2.data.datasets"):
        register_digits(other, names=names)
    assert any("replacing" in r.getMessage() for r in caplog.records)
    assert MetadataCatalog.get(names[0]).image_root == os.path.join(other, "train")
    assert len(DatasetCatalog.get(names[0])) == 2
    with pytest.raises(ValueError, match="one name per split"):
        register_digits(digits_root, names=names[:1])


def test_coco_evaluator_scores_ground_truth_perfectly(digits_root, names, tmp_path):
    register_digits(digits_root, names=names)
    # The venv's detectron2._C is an empty stub (no compiled COCOeval): use pycocotools.
    evaluator = COCOEvaluator(
        names[1], output_dir=str(tmp_path), tasks=("bbox",), use_fast_impl=False
    )
    evaluator.reset()
    for record in DatasetCatalog.get(names[1]):
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
        ]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def _write_user_dataset(folder, categories):
    images = folder / "images"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    annotations = [
        {"id": i + 1, "image_id": 5, "category_id": c["id"], "bbox": box, "iscrowd": 0}
        for i, (c, box) in enumerate(
            [(categories[-1], [1, 2, 10, 8]), (categories[0], [3, 3, 5, 5])]
        )
    ]
    content = {
        "images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": annotations,
        "categories": categories,
    }
    json_file = folder / "instances.json"
    json_file.write_text(json.dumps(content))
    return json_file, images


def test_register_coco_format_dataset(tmp_path, names):
    categories = [{"id": 11, "name": "cat"}, {"id": 3, "name": "ant"}, {"id": 7, "name": "bee"}]
    json_file, images = _write_user_dataset(tmp_path, categories)
    assert register_coco_format_dataset(names[0], json_file, images) == 3
    assert register_coco_format_dataset(names[0], str(json_file), str(images)) == 3
    metadata = MetadataCatalog.get(names[0])
    assert metadata.thing_classes == ["ant", "bee", "cat"]
    assert metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2}
    assert metadata.evaluator_type == "coco" and metadata.json_file == str(json_file)
    (record,) = DatasetCatalog.get(names[0])
    assert record["file_name"] == str(images / "a.png")
    # The annotations use ids 7 (the last category listed) and 11 (the first).
    assert [a["category_id"] for a in record["annotations"]] == [1, 2]


def test_register_coco_format_dataset_errors(tmp_path, names):
    json_file, images = _write_user_dataset(tmp_path, [{"id": 1, "name": "thing"}])
    missing_json = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_format_dataset(names[0], missing_json, images)
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_format_dataset(names[0], json_file, tmp_path / "no_images")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="empty.json"):
        register_coco_format_dataset(names[0], empty, images)
    assert names[0] not in DatasetCatalog.list()


def test_default_datasets_root(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert default_datasets_root() == "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data/d2")
    assert default_datasets_root() == "/data/d2"
