import contextlib
import io
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from dino_d2.data import digits
from dino_d2.data.digits import (
    DIGIT_CLASSES,
    MARKER_NAME,
    TRAIN_DIGITS,
    VAL_DIGITS,
    digits_dataset_info,
    ensure_digits_dataset,
    generate_digits_dataset,
)

_NUM = {"train": 12, "val": 6}
_SIZE = 320


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    generate_digits_dataset(root, num_train=_NUM["train"], num_val=_NUM["val"], seed=0)
    return root


def _coco(root, split):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"{split}.json"))


def _xyxy(annotation):
    x, y, w, h = annotation["bbox"]
    return x, y, x + w, y + h


def _area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def _iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / (_area(a) + _area(b) - inter)


def _files(root):
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _, names in os.walk(root)
        for name in names
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_layout_and_coco_json(dataset, split):
    coco = _coco(dataset, split)
    assert sorted(coco.getImgIds()) == list(range(1, _NUM[split] + 1))
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(DIGIT_CLASSES)
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    annotation_ids = sorted(coco.getAnnIds())
    assert annotation_ids == list(range(1, len(annotation_ids) + 1))
    for image_info in coco.loadImgs(coco.getImgIds()):
        path = dataset / split / image_info["file_name"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (image_info["width"], image_info["height"]) == (_SIZE, _SIZE)
    pngs = sorted(os.listdir(dataset / split))
    assert pngs == sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds()))
    info = digits_dataset_info(dataset)
    assert info["splits"][split]["images"] == _NUM[split]
    assert info["splits"][split]["annotations"] == len(annotation_ids)


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_counts_overlaps_and_labels(dataset, split):
    coco = _coco(dataset, split)
    _, labels = digits._source_digits()
    source = TRAIN_DIGITS if split == "train" else VAL_DIGITS
    for image_id in coco.getImgIds():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert 1 <= len(annotations) <= 6
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert all(isinstance(v, int) for v in (x, y, w, h))
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= _SIZE and y + h <= _SIZE
            assert w <= 64 and h <= 64
            assert 0 < annotation["area"] <= w * h and annotation["iscrowd"] == 0
            assert annotation["digit_index"] in source
            assert annotation["category_id"] == labels[annotation["digit_index"]] + 1
        for a, b in itertools.combinations(annotations, 2):
            assert _iou(_xyxy(a), _xyxy(b)) <= 0.3


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_lie_in_their_boxes_and_cover_the_ink(dataset, split):
    """Each RLE mask's tight box is its bbox, its area is its pixel count, and it holds exactly
    the glyph's ink (alpha >= 0.3) re-rendered from the source digit at the box's place."""
    coco = _coco(dataset, split)
    images, _ = digits._source_digits()
    for annotation in coco.dataset["annotations"]:
        rle = annotation["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [_SIZE, _SIZE]
        mask = mask_util.decode(rle).astype(bool)
        assert mask.sum() == annotation["area"] == coco.annToMask(annotation).sum()
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y, w, h = annotation["bbox"]
        assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x, y, x + w, y + h)
        inside = np.zeros_like(mask)
        inside[y : y + h, x : x + w] = True
        assert not (mask & ~inside).any()
        # The glyph's ink, upscaled to the size whose ink box matches, covers the mask exactly.
        source = images[annotation["digit_index"]]
        found = False
        for size in range(16, 65):
            alpha = digits._digit_alpha(source, size)
            x0, y0, x1, y1 = digits._ink_box(alpha)
            if (x1 - x0, y1 - y0) != (w, h):
                continue
            ink = alpha[y0:y1, x0:x1] >= 0.3
            if np.array_equal(mask[y : y + h, x : x + w], ink):
                found = True
                break
        assert found, f"annotation {annotation['id']}: the mask is not the glyph's ink"


def test_old_format_version_is_regenerated_with_masks(tmp_path, caplog):
    """A dataset written by format version 1 (no masks) is noticed and regenerated."""
    root = tmp_path / "digits"
    options = dict(num_train=2, num_val=1, seed=3, log_every=0)
    generate_digits_dataset(root, **options)
    marker = root / MARKER_NAME
    info = json.loads(marker.read_text())
    info["parameters"]["format_version"] = 1
    marker.write_text(json.dumps(info))
    json_file = root / "annotations" / "train.json"
    content = json.loads(json_file.read_text())
    for annotation in content["annotations"]:
        del annotation["segmentation"]
    json_file.write_text(json.dumps(content))
    with caplog.at_level("INFO", logger="dino_d2.data.digits"):
        assert ensure_digits_dataset(root, **options) == str(root)
    assert any("format version 1" in r.getMessage() for r in caplog.records)
    assert digits_dataset_info(root)["parameters"]["format_version"] == 2
    annotations = json.loads(json_file.read_text())["annotations"]
    assert annotations and all("segmentation" in a for a in annotations)
    assert os.listdir(tmp_path) == ["digits"]
    # A newer version than this code writes is not replaced.
    info = json.loads(marker.read_text())
    info["parameters"]["format_version"] = 99
    marker.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="generated with"):
        ensure_digits_dataset(root, **options)


def test_train_and_val_handwriting_are_disjoint(dataset):
    used = {
        split: {a["digit_index"] for a in _coco(dataset, split).dataset["annotations"]}
        for split in ("train", "val")
    }
    assert max(used["train"]) < 1500 <= min(used["val"])
    assert TRAIN_DIGITS.stop == VAL_DIGITS.start and VAL_DIGITS.stop == 1797


def test_ink_box_is_tight():
    alpha = np.zeros((16, 16), dtype=np.float32)
    alpha[3:7, 2:9] = 0.8
    alpha[10, 12] = 0.2  # faint, below the ink threshold
    assert digits._ink_box(alpha) == (2, 3, 9, 7)
    images, _ = digits._source_digits()
    for index in (0, 1, 500, 1796):
        for size in (16, 64):
            alpha = digits._digit_alpha(images[index], size)
            x0, y0, x1, y1 = digits._ink_box(alpha)
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert (alpha[y0:y1, x0:x1] >= 0.3).any(axis=0).all()
            assert (alpha[y0:y1, x0:x1] >= 0.3).any(axis=1).all()


def test_digits_contrast_with_the_background():
    rng = np.random.default_rng(0)
    luma = np.array([0.299, 0.587, 0.114])
    for background in rng.integers(0, 256, size=(200, 3)).astype(np.float64):
        colour = digits._contrasting_colour(rng, background)
        assert abs(colour @ luma - background @ luma) >= 96 - 1e-6


def test_deterministic_given_the_seed(tmp_path):
    options = dict(num_train=3, num_val=2, seed=5, log_every=0)
    first = generate_digits_dataset(tmp_path / "a", **options)
    second = generate_digits_dataset(tmp_path / "b", **options)
    other = generate_digits_dataset(tmp_path / "c", **{**options, "seed": 6})
    files = _files(first)
    assert files == _files(second) == _files(other)
    assert len(files) == 3 + 2 + 2 + 1

    def read(root, name):
        with open(os.path.join(root, name), "rb") as f:
            return f.read()

    assert all(read(first, name) == read(second, name) for name in files)
    pngs = [name for name in files if name.endswith(".png")]
    assert all(read(first, name) != read(other, name) for name in pngs)


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch, interruption):
    render = digits._render_image
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise interruption("interrupted")
        return render(*args, **kwargs)

    monkeypatch.setattr(digits, "_render_image", failing_render)
    root = tmp_path / "digits"
    with pytest.raises(interruption):
        generate_digits_dataset(root, num_train=3, num_val=2, log_every=0)
    assert not root.exists() and digits_dataset_info(root) is None
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(digits, "_render_image", render)
    assert ensure_digits_dataset(root, num_train=3, num_val=2, log_every=0) == str(root)
    assert (root / MARKER_NAME).is_file()


def test_ensure_generates_only_when_absent(tmp_path, monkeypatch):
    root = tmp_path / "nested" / "digits"
    options = dict(num_train=2, num_val=1, seed=1, log_every=0)
    assert ensure_digits_dataset(root, **options) == str(root)
    assert digits_dataset_info(root)["parameters"]["seed"] == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("a complete dataset must not be regenerated")

    monkeypatch.setattr(digits, "generate_digits_dataset", no_generation)
    assert ensure_digits_dataset(root, **options) == str(root)
    with pytest.raises(ValueError, match="generated with"):
        ensure_digits_dataset(root, **{**options, "seed": 2})

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(FileExistsError, match=MARKER_NAME):
        ensure_digits_dataset(foreign, **options)


def test_generate_refuses_or_replaces_an_existing_root(tmp_path):
    root = tmp_path / "digits"
    generate_digits_dataset(root, num_train=2, num_val=1, seed=0, log_every=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_digits_dataset(root, num_train=2, num_val=1, seed=0, log_every=0)
    generate_digits_dataset(root, num_train=3, num_val=1, seed=0, overwrite=True, log_every=0)
    assert digits_dataset_info(root)["splits"]["train"]["images"] == 3
    assert len(os.listdir(root / "train")) == 3
    assert os.listdir(tmp_path) == ["digits"]


def test_progress_is_logged(tmp_path, caplog):
    with caplog.at_level("INFO", logger="dino_d2.data.digits"):
        generate_digits_dataset(tmp_path / "d", num_train=3, num_val=1, log_every=2)
    messages = [r.getMessage() for r in caplog.records]
    assert any("2/4 images" in m for m in messages) and any("4/4 images" in m for m in messages)


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_digits_dataset(tmp_path / "d", num_train=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_digits_dataset(tmp_path / "d", image_size=32)
    assert os.listdir(tmp_path) == []


def test_marker_records_parameters(dataset):
    with open(dataset / MARKER_NAME) as f:
        marker = json.load(f)
    assert marker["parameters"] == {
        "format_version": 2,
        "seed": 0,
        "num_train": _NUM["train"],
        "num_val": _NUM["val"],
        "image_size": _SIZE,
    }
    assert marker["splits"]["train"]["digit_indices"] == [0, 1500]
    assert marker["splits"]["val"]["digit_indices"] == [1500, 1797]
