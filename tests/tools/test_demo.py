"""tools/demo.py on generated images with a tiny randomly initialised DINO (CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog

from dino_d2.cli import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "demo.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dino_config):
    """A saved tiny config, a checkpoint of its random initialisation, two images, a bad one."""
    root = tmp_path_factory.mktemp("demo")
    cfg = tiny_dino_config()
    cfg.train.init_checkpoint = ""
    config = str(root / "tiny.yaml")
    LazyConfig.save(cfg, config)
    torch.manual_seed(0)
    DetectionCheckpointer(instantiate(cfg.model), save_dir=str(root)).save("tiny")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.jpg", (60, 90)), ("b.png", (80, 50))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    bad = root / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return {"root": root, "config": config, "checkpoint": str(root / "tiny.pth")}


def test_writes_one_png_per_image_and_the_detections(setup):
    out = setup["root"] / "out"
    command = [
        sys.executable, TOOL, "--config-file", setup["config"],
        "--checkpoint", setup["checkpoint"],
        "--input", str(setup["root"] / "images" / "*.jpg"), str(setup["root"] / "images" / "b.png"),
        "--output", str(out), "--score-threshold", "0",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/2]" in result.stdout + result.stderr

    assert sorted(os.listdir(out)) == ["a.png", "b.png", "detections.json"]
    for name, size in (("a.png", (90, 60)), ("b.png", (50, 80))):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size == size
    with open(out / "detections.json") as f:
        results = json.load(f)
    assert results["score_threshold"] == 0 and results["skipped"] == []
    coco = MetadataCatalog.get("coco_2017_val").thing_classes
    assert [(r["file"][-5:], r["height"], r["width"]) for r in results["images"]] == [
        ("a.jpg", 60, 90),
        ("b.png", 80, 50),
    ]
    for image in results["images"]:
        detections = image["detections"]
        assert 0 < len(detections) <= 10  # num_select
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            assert set(d) == {"box", "score", "class_id", "class_name"}
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= image["width"] and 0 <= y0 <= y1 <= image["height"]
            assert d["class_name"] == coco[d["class_id"]]


def test_score_threshold_and_no_silent_overwrite(setup):
    out = setup["root"] / "strict"
    args = ["--config-file", setup["config"], "--checkpoint", setup["checkpoint"]]
    args += ["--input", str(setup["root"] / "images"), "--output", str(out)]
    assert demo.main([*args, "--score-threshold", "1.01"]) == 0
    with open(out / "detections.json") as f:
        assert [len(r["detections"]) for r in json.load(f)["images"]] == [0, 0]
    with pytest.raises(demo.DemoError, match="already exist.*--overwrite"):
        demo.plan_outputs([str(setup["root"] / "images" / "a.jpg")], str(out), overwrite=False)
    assert demo.main([*args, "--overwrite", "--score-threshold", "0"]) == 0
    with open(out / "detections.json") as f:
        assert all(r["detections"] for r in json.load(f)["images"])


def test_unreadable_image_is_named_or_skipped(setup, capsys):
    broken = str(setup["root"] / "bad" / "broken.jpg")
    good = str(setup["root"] / "images" / "a.jpg")
    args = ["--config-file", setup["config"], "--checkpoint", setup["checkpoint"]]

    out = setup["root"] / "bad_out"
    assert demo.main([*args, "--input", good, broken, "--output", str(out)]) == 2
    assert f"cannot read image {broken}" in capsys.readouterr().err
    missing = str(setup["root"] / "missing.jpg")
    assert demo.main([*args, "--input", missing, "--output", str(out), "--overwrite"]) == 2
    assert f"cannot read image {missing}" in capsys.readouterr().err

    no_weights = str(setup["root"] / "missing.pth")
    argv = [*args[:2], "--checkpoint", no_weights, "--input", good, "--output", str(out)]
    assert demo.main(argv) == 2
    assert f"the checkpoint {no_weights} does not exist" in capsys.readouterr().err

    skip = setup["root"] / "skip_out"
    argv = [*args, "--input", good, broken, "--output", str(skip), "--skip-bad-images"]
    assert demo.main(argv) == 0
    with open(skip / "detections.json") as f:
        results = json.load(f)
    assert [r["file"] for r in results["images"]] == [good]
    assert [s["file"] for s in results["skipped"]] == [broken]
    assert sorted(os.listdir(skip)) == ["a.png", "detections.json"]


def test_inputs_expand_and_names_do_not_collide(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "img.jpg").write_bytes(b"")
        (tmp_path / folder / "notes.txt").write_text("")
    images = demo.collect_images([str(tmp_path / "x"), str(tmp_path / "*" / "*.jpg")])
    assert images == [str(tmp_path / "x" / "img.jpg"), str(tmp_path / "y" / "img.jpg")]
    assert demo.plan_outputs(images, str(tmp_path / "out"), overwrite=False) == [
        "img.png",
        "img_1.png",
    ]
    with pytest.raises(demo.DemoError, match="no image matches"):
        demo.collect_images([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(demo.DemoError, match="has no images"):
        demo.collect_images([str(tmp_path / "empty")])


def test_labels_are_class_ids_without_class_names(tiny_dino_config):
    cfg = tiny_dino_config()
    assert (
        demo.load_metadata(cfg, 80).thing_classes
        == MetadataCatalog.get("coco_2017_val").thing_classes
    )
    assert demo.load_metadata(cfg, 91).get("thing_classes", None) is None
    cfg.dataloader.test.dataset.names = "no_such_dataset"
    assert demo.load_metadata(cfg, 80).get("thing_classes", None) is None


class _MaskPredictor:
    """Predicts one fixed detection with a ring-shaped mask (or without its mask)."""

    input_format = "RGB"

    def __init__(self, with_masks: bool):
        self.with_masks = with_masks

    def __call__(self, image):
        from detectron2.structures import Boxes, Instances

        height, width = image.shape[:2]
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(torch.tensor([[10.0, 8.0, 40.0, 38.0]]))
        instances.scores = torch.tensor([0.9])
        instances.pred_classes = torch.tensor([3])
        if self.with_masks:
            masks = torch.zeros(1, height, width, dtype=torch.bool)
            masks[0, 10:36, 12:38] = True
            masks[0, 18:28, 20:30] = False
            instances.pred_masks = masks
        return instances


def test_masks_are_drawn_and_written(tmp_path):
    from detectron2.data import Metadata
    from pycocotools import mask as mask_util

    image = tmp_path / "grey.png"
    Image.fromarray(np.full((50, 60, 3), 128, np.uint8)).save(image)
    metadata = Metadata(thing_classes=[str(d) for d in range(10)])
    drawn = {}
    for with_masks in (True, False):
        out = tmp_path / f"out_{with_masks}"
        results = demo.run_demo(
            _MaskPredictor(with_masks), [str(image)], str(out), metadata=metadata
        )
        with Image.open(out / "grey.png") as png:
            drawn[with_masks] = np.asarray(png.convert("RGB")).astype(int)
        (detection,) = results["images"][0]["detections"]
        assert ("mask" in detection) == with_masks
    mask = mask_util.decode(detection_with_mask(tmp_path)).astype(bool)
    assert mask.sum() == 26 * 26 - 10 * 10 and mask[12, 14] and not mask[22, 24]
    difference = np.abs(drawn[True] - drawn[False]).sum(axis=2)
    # The ring is filled with the mask's colour; the far corner is untouched.
    assert (difference[12:16, 14:36] > 0).mean() > 0.9
    assert (difference[:5, 50:] == 0).all() and (difference[:, 56:] == 0).all()


def detection_with_mask(tmp_path):
    with open(tmp_path / "out_True" / demo.DETECTIONS_FILE) as f:
        return json.load(f)["images"][0]["detections"][0]["mask"]
