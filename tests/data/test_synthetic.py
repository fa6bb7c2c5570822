"""The synthetic Objects365-shaped json: valid, seeded, in either order, chunk-consistent, with
a long-tailed class frequency and boxes inside their images; the cache reads it like the json
path."""

import json
from collections import Counter

import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.cli.make_synthetic_coco import main
from dino_d2.data import register_coco_format_dataset, synthetic


@pytest.fixture
def small_chunks(monkeypatch):
    # Several chunks (and patch folders) at a test's size.
    monkeypatch.setattr(synthetic, "_CHUNK", 64)
    monkeypatch.setattr(synthetic, "_PATCH", 100)


def test_written_json_is_objects365_shaped(tmp_path, small_chunks):
    path = tmp_path / "o365.json"
    written = synthetic.write_synthetic_coco(str(path), num_images=300, num_classes=50)
    content = json.loads(path.read_text())
    assert list(content) == ["images", "annotations", "categories"]
    assert written == {
        "images": 300,
        "annotations": len(content["annotations"]),
        "bytes": path.stat().st_size,
    }
    images = {image["id"]: image for image in content["images"]}
    assert sorted(images) == list(range(1, 301))
    assert {image["file_name"].split("/")[0] for image in images.values()} == {
        "patch0",
        "patch1",
        "patch2",
    }
    assert 10 < len(content["annotations"]) / 300 < 20
    assert [a["id"] for a in content["annotations"]] == list(
        range(1, len(content["annotations"]) + 1)
    )
    for annotation in content["annotations"]:
        x, y, w, h = annotation["bbox"]
        image = images[annotation["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= image["width"] and y + h <= image["height"]
    counts = sorted(Counter(a["category_id"] for a in content["annotations"]).values())
    assert counts[-1] > 5 * np.median(counts)  # long-tailed
    assert {c["id"] for c in content["categories"]} == set(range(1, 51))


def test_seeded_and_either_order(tmp_path, small_chunks):
    paths = [tmp_path / f"{k}.json" for k in range(4)]
    synthetic.write_synthetic_coco(str(paths[0]), num_images=150, seed=3)
    synthetic.write_synthetic_coco(str(paths[1]), num_images=150, seed=3)
    synthetic.write_synthetic_coco(str(paths[2]), num_images=150, seed=4)
    synthetic.write_synthetic_coco(str(paths[3]), num_images=150, seed=3, annotations_first=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
    first, reordered = (json.loads(p.read_text()) for p in (paths[0], paths[3]))
    assert list(reordered) == ["annotations", "images", "categories"]
    assert first == reordered


def test_the_cache_reads_it_as_the_json_path(tmp_path, small_chunks):
    path = tmp_path / "o365.json"
    synthetic.write_synthetic_coco(str(path), num_images=200, annotations_first=True)
    names = ("test_synthetic_cache", "test_synthetic_json")
    try:
        for name, cache in zip(names, (True, False)):
            assert register_coco_format_dataset(name, path, tmp_path, cache=cache) == 365
        cached, listed = (DatasetCatalog.get(name) for name in names)
        assert [r["image_id"] for r in cached] == [r["image_id"] for r in listed]
        for ours, theirs in zip(cached, listed):
            np.testing.assert_allclose(
                [a["bbox"] for a in ours["annotations"]],
                [a["bbox"] for a in theirs["annotations"]],
                rtol=1e-6,
            )
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def test_command_line_scale(tmp_path, capsys):
    path = tmp_path / "scaled.json"
    assert main([str(path), "--num-images", "2000", "--scale", "0.01", "--num-classes", "5"]) == 0
    assert len(json.loads(path.read_text())["images"]) == 20
    assert "20 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(path), "--scale", "0"])
