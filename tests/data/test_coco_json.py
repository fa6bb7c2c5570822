"""Malformed COCO jsons: errors that name the file, the dataset, the annotation and the field;
skipping on request with one warning; annotations of unknown images counted once. Each test runs
on both paths: the memory-mapped cache (the default) and the json read whole (cache=False)."""

import copy
import functools
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from dino_d2.data import register_coco_format_dataset
from dino_d2.data.coco_json import CocoFormatError
from dino_d2.data.datasets import load_coco_format_json

NAME = "test_coco_json"


def _content():
    """Two 40x50 images, four good annotations, categories 1 and 7 (ids not contiguous)."""
    boxes = [(1, 1, [2, 3, 18, 27]), (1, 7, [20, 5, 10, 10]), (2, 7, [1, 1, 30, 30])]
    boxes.append((2, 1, [5, 6, 7, 8]))
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 50},
            {"id": 2, "file_name": "b.png", "height": 40, "width": 50},
        ],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": 1, "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 7, "name": "seven"}],
    }


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / name)
    yield tmp_path
    if NAME in DatasetCatalog.list():
        DatasetCatalog.remove(NAME)
        MetadataCatalog.remove(NAME)


@pytest.fixture(params=[True, False], ids=["cache", "json"])
def register(request):
    return functools.partial(register_coco_format_dataset, cache=request.param)


def _write(folder, content, name="instances.json"):
    path = folder / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return str(path)


def test_truncated_json_names_file_and_dataset_with_position_and_text(folder, register):
    text = json.dumps(_content())
    path = _write(folder, text[:300])
    with pytest.raises(CocoFormatError) as error:
        register(NAME, path, folder)
    message = str(error.value)
    assert path in message and f"dataset '{NAME}'" in message
    line, column = (int(v) for v in re.search(r"line (\d+), column (\d+)", message).groups())
    assert line == 1
    if isinstance(error.value.__cause__, json.JSONDecodeError):
        assert column == error.value.__cause__.colno
    excerpt_line, caret_line = message.splitlines()[1:3]
    # The excerpt is the file's text around the error, the caret under the error's character.
    assert excerpt_line.strip(" .") in text[:300]
    caret = caret_line.index("^")
    position = column - 1
    assert excerpt_line[caret - 20 : caret] == text[position - 20 : position]
    assert "is it truncated" in message
    assert NAME not in DatasetCatalog.list()


def test_syntax_error_on_a_later_line_shows_that_line(folder, register):
    lines = json.dumps(_content(), indent=1).splitlines()
    broken = next(i for i, line in enumerate(lines) if '"file_name": "b.png"' in line)
    lines[broken] = lines[broken].rstrip(",")  # a missing comma
    path = _write(folder, "\n".join(lines))
    with pytest.raises(CocoFormatError) as error:
        register(NAME, path, folder)
    message = str(error.value)
    assert f"line {broken + 2}, column" in message
    excerpt_line, caret_line = message.splitlines()[1:3]
    assert excerpt_line.strip() == lines[broken + 1].strip()
    assert excerpt_line[caret_line.index("^")] == '"'  # the next key, where a comma was due
    assert "truncated" not in message


def test_not_utf8_and_not_an_object(folder, register):
    path = folder / "latin1.json"
    path.write_bytes('{"images": [{"file_name": "\xe9"}]}'.encode("latin-1"))
    with pytest.raises(CocoFormatError, match=re.escape(f"{path} (dataset '{NAME}') is not UTF-8")):
        register(NAME, str(path), folder)
    with pytest.raises(CocoFormatError, match="holds a JSON list"):
        register(NAME, _write(folder, "[1, 2]"), folder)


BAD_ANNOTATIONS = [
    ("bbox", "10,10,5,5", '"10,10,5,5" (a string)', "a list of 4 numbers"),
    ("bbox", [10, 10, 5], "[10, 10, 5] (a list of 3)", "a list of 4 numbers"),
    ("bbox", [10, 10, "5", 5], '[10, 10, "5", 5] (a list of 4)', "a list of 4 numbers"),
    ("bbox", None, "null", "a list of 4 numbers"),
    ("category_id", "7", '"7" (a string)', "an integer"),
    ("category_id", 3, "3 (int)", "one of the category ids [1, 7]"),
    ("image_id", None, "null", "an integer (the 'id' of an entry of 'images')"),
    ("image_id", 2.0, "2.0 (float)", "an integer"),
    ("iscrowd", 2, "2 (int)", "0 or 1"),
    ("id", True, "true (bool)", "an integer"),
]


@pytest.mark.parametrize("field, value, shown, expected", BAD_ANNOTATIONS)
def test_malformed_annotation_names_file_annotation_field_and_expectation(
    folder, register, field, value, shown, expected
):
    content = _content()
    content["annotations"][2][field] = value
    path = _write(folder, content)
    with pytest.raises(CocoFormatError) as error:
        register(NAME, path, folder)
    message = str(error.value)
    assert message.startswith(f"{path} (dataset '{NAME}'): ")
    name = "annotation id 3 (annotations[2])" if field != "id" else "annotations[2]"
    assert f"{name}: '{field}' is {shown}; expected {expected}" in message
    assert "dataset.skip_bad_annotations=True" in message


def test_missing_field_and_repeated_id(folder, register):
    content = _content()
    del content["annotations"][1]["bbox"]
    with pytest.raises(
        CocoFormatError,
        match=r"annotation id 2 \(annotations\[1\]\): 'bbox' is " "missing; expected",
    ):
        register(NAME, _write(folder, content), folder)
    content = _content()
    content["annotations"][3]["id"] = 1
    with pytest.raises(
        CocoFormatError,
        match="annotation id 1 .annotations.3..: 'id' is 1 .int.; "
        "expected an integer, unique in the file .this one is repeated.",
    ):
        register(NAME, _write(folder, content), folder)


def test_malformed_image_and_category_entries(folder, register):
    content = _content()
    content["images"][1]["height"] = "40"
    with pytest.raises(CocoFormatError, match=r"image id 2 \(images\[1\]\) has 'height' \"40\""):
        register(NAME, _write(folder, content), folder)
    content = _content()
    content["categories"][1]["id"] = "7"
    with pytest.raises(CocoFormatError, match=r"categories\[1\] is .* expected an object with"):
        register(NAME, _write(folder, content), folder)


def test_skipping_counts_malformed_annotations_by_field_in_one_warning(folder, register, caplog):
    content = _content()
    good = copy.deepcopy(content["annotations"])
    extra = [
        {"bbox": "10,10,5,5"},
        {"bbox": [1, 2, 3]},
        {"category_id": "1"},
        {"image_id": None},
    ]
    for k, change in enumerate(extra):
        content["annotations"].append(dict(good[0], id=100 + k, **change))
    path = _write(folder, content)
    with caplog.at_level(logging.WARNING):
        assert register(NAME, path, folder, skip_bad_annotations=True) == 2
        dicts = DatasetCatalog.get(NAME)
        DatasetCatalog.get(NAME)
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path} (dataset '{NAME}'): 4 malformed annotations skipped")
    assert "(2 with a bad 'bbox', 1 with a bad 'category_id', 1 with a bad 'image_id')" in (
        warnings[0]
    )
    assert "annotation id 100 (annotations[4]): 'bbox' is \"10,10,5,5\" (a string)" in warnings[0]
    loaded = [a["bbox"] for record in dicts for a in record["annotations"]]
    assert loaded == [a["bbox"] for a in good]
    metadata = MetadataCatalog.get(NAME)
    # The evaluator must not read the malformed file: it converts the kept annotations.
    assert "json_file" not in metadata.as_dict() and metadata.coco_json_file == path


def test_evaluation_after_skipping_uses_the_kept_annotations(folder, register, tmp_path):
    content = _content()
    content["annotations"].append(dict(content["annotations"][0], id=50, bbox="1,2,3,4"))
    path = _write(folder, content)
    register(NAME, path, folder, skip_bad_annotations=True)
    evaluator = COCOEvaluator(NAME, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get(NAME):
        annotations = record["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_annotations_of_unknown_images_are_counted_once_naming_the_file(folder, register, caplog):
    content = _content()
    content["annotations"][1]["image_id"] = 999
    content["annotations"][3]["image_id"] = 3
    path = _write(folder, content)
    with caplog.at_level(logging.WARNING):
        register(NAME, path, folder)
        dicts = DatasetCatalog.get(NAME)
        DatasetCatalog.get(NAME)
    warnings = [r.getMessage() for r in caplog.records if "not among the images" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path} (dataset '{NAME}'): 2 annotations dropped")
    assert "annotation id 2: image_id 999 is not among the images" in warnings[0]
    assert [len(record["annotations"]) for record in dicts] == [1, 1]
    # Unknown images only: the evaluator can still read the json itself.
    assert MetadataCatalog.get(NAME).json_file == path


def test_same_dataset_dicts_as_detectron2_load_coco_json(folder, register):
    content = _content()
    content["annotations"][0]["iscrowd"] = 1
    del content["annotations"][1]["iscrowd"]
    content["annotations"][2]["bbox"] = [1.5, 2.25, 30.0, 10]
    path = _write(folder, content)
    register(NAME, path, folder)
    ours = load_coco_format_json(path, str(folder), NAME)
    theirs = load_coco_json(path, str(folder), NAME)
    assert ours == theirs
    assert [a["category_id"] for r in ours for a in r["annotations"]] == [0, 1, 1, 0]
