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
