"""dino_d2's COCOEvaluator: Detectron2's results, and output files a failed write never damages."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator as DetectronCOCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from dino_d2.utils import OutputWriteError
from dino_d2.data import register_coco_format_dataset
from dino_d2.evaluation import COCOEvaluator

NAME = "test_coco_evaluation"


@pytest.fixture
def dataset(tmp_path):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 3, 18, 27],
                "area": 486,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [25, 5, 20, 20],
                "area": 400,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    register_coco_format_dataset(NAME, str(tmp_path / "gt.json"), str(tmp_path))
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _evaluate(evaluator, shift=0.0):
    evaluator.reset()
    for record in DatasetCatalog.get(NAME):
        annotations = record["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32) + shift)
        instances.scores = torch.tensor([0.9, 0.8])
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def test_same_results_and_files_as_detectron2(dataset, tmp_path):
    ours = _evaluate(COCOEvaluator(dataset, output_dir=str(tmp_path / "ours"), use_fast_impl=False))
    theirs = _evaluate(
        DetectronCOCOEvaluator(dataset, output_dir=str(tmp_path / "theirs"), use_fast_impl=False)
    )
    assert json.dumps(ours) == json.dumps(theirs)  # NaN for the empty area ranges
    assert ours["bbox"]["AP"] == pytest.approx(100.0)
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))
    assert sorted(os.listdir(tmp_path / "ours")) == [
        "coco_instances_results.json",
        "instances_predictions.pth",
    ]
    results = "coco_instances_results.json"
    assert (tmp_path / "ours" / results).read_text() == (tmp_path / "theirs" / results).read_text()


class _FullAfter:
    """A file that accepts ``budget`` bytes, then fails with ENOSPC."""

    def __init__(self, file, budget):
        self._file, self._left = file, budget

    def write(self, data):
        if len(data) > self._left:
            self._file.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


@pytest.mark.parametrize("failing", ["instances_predictions.pth", "coco_instances_results.json"])
def test_a_full_disk_leaves_the_previous_files(dataset, tmp_path, monkeypatch, failing):
    output_dir = tmp_path / "eval"
    evaluator = COCOEvaluator(dataset, output_dir=str(output_dir), use_fast_impl=False)
    _evaluate(evaluator)
    before = _files(output_dir)
    from detectron2.evaluation import coco_evaluation

    real_open = coco_evaluation.PathManager.open

    def open_filling_up(path, mode="r", **kwargs):
        file = real_open(path, mode, **kwargs)
        return _FullAfter(file, 100) if os.path.basename(path) == failing else file

    monkeypatch.setattr(coco_evaluation.PathManager, "open", open_filling_up)
    with pytest.raises(OutputWriteError) as error:
        _evaluate(evaluator, shift=1.0)  # other detections: the files would change
    message = str(error.value)
    assert message.startswith(f"Could not write {failing} in {output_dir}: No space left on device")
    assert "The evaluation files already in the folder are unchanged." in message
    assert _files(output_dir) == before  # no truncated file, no staging folder left


def test_staging_folders_of_killed_jobs_are_removed(dataset, tmp_path):
    output_dir = tmp_path / "eval"
    stale = output_dir / ".coco_eval.0123456789ab.tmp"
    stale.mkdir(parents=True)
    (stale / "instances_predictions.pth").write_bytes(b"half")
    os.utime(stale, (1e9, 1e9))
    kept = output_dir / ".coco_eval.notours.tmp"
    kept.mkdir()
    _evaluate(COCOEvaluator(dataset, output_dir=str(output_dir), use_fast_impl=False))
    assert not stale.exists() and kept.exists()
