"""dino_d2's DatasetMapper on awkward files and annotations (through Detectron2's data path)."""

import logging

import numpy as np
import pytest
from PIL import Image

from detectron2.structures import BoxMode

from dino_d2._compat import build_detection_train_loader
from dino_d2.data import DatasetMapper, UnreadableImageError


def _mapper(is_train=True, **kwargs):
    return DatasetMapper(
        is_train=is_train,
        augmentations=[],
        image_format="RGB",
        use_instance_mask=False,
        dataset_name="my_dataset",
        **kwargs,
    )


def _record(path, height, width, boxes=()):
    annotations = [
        {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": i % 3}
        for i, b in enumerate(boxes)
    ]
    return {"file_name": str(path), "height": height, "width": width, "annotations": annotations}


@pytest.mark.parametrize(
    "mode, array",
    [
        ("L", np.full((20, 30), 77, np.uint8)),
        ("RGBA", np.dstack([np.full((20, 30, 3), 77, np.uint8), np.zeros((20, 30), np.uint8)])),
        ("RGB", np.full((20, 30, 3), 77, np.uint8)),
    ],
)
def test_grayscale_rgba_and_rgb_pngs_become_3_channel_uint8(tmp_path, mode, array):
    path = tmp_path / "image.png"
    Image.fromarray(array, mode=mode).save(path)
    mapped = _mapper()(_record(path, 20, 30, [(1, 1, 10, 10)]))
    image = mapped["image"]
    assert tuple(image.shape) == (3, 20, 30) and str(image.dtype) == "torch.uint8"
    assert (image == 77).all()  # RGBA: the alpha is dropped, not blended
    assert len(mapped["instances"]) == 1


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    values = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = _mapper(is_train=False)(_record(path, 20, 30))["image"].numpy()
    expected = np.rint(values / 257.0).astype(np.uint8)
    for channel in image:
        np.testing.assert_array_equal(channel, expected)
    assert len(np.unique(image)) > 200  # Detectron2's read_image would saturate most to 255


def test_degenerate_boxes_are_clipped_or_dropped(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)
    nan = float("nan")
    boxes = [
        (2, 3, 20, 30),  # good
        (40, 30, 80, 90),  # leaves the image: clipped to (40, 30, 50, 40)
        (5, 5, 5, 20),  # zero width
        (30, 30, 20, 35),  # negative width
        (nan, 1, 10, 10),  # not a number
        (60, 50, 70, 60),  # wholly outside
    ]
    instances = _mapper()(_record(path, 40, 50, boxes))["instances"]
    np.testing.assert_array_equal(
        instances.gt_boxes.tensor.numpy(), [[2, 3, 20, 30], [40, 30, 50, 40]]
    )
    assert instances.gt_classes.tolist() == [0, 1]


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated"])
def test_unreadable_image_names_the_file_and_the_dataset(tmp_path, problem):
    path = tmp_path / "broken.png"
    if problem == "corrupt":
        path.write_bytes(b"this is not a png")
    elif problem == "truncated":
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    for is_train in (True, False):
        with pytest.raises(UnreadableImageError, match=r"broken\.png of dataset my_dataset"):
            _mapper(is_train)(_record(path, 40, 40))


def test_unreadable_image_is_skipped_in_training_when_asked(tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    records = [_record(tmp_path / "missing.png", 8, 8, [(1, 1, 5, 5)]), _record(good, 8, 8)]
    records[1]["annotations"] = records[0]["annotations"]
    with caplog.at_level(logging.WARNING):
        assert _mapper(skip_unreadable=True)(records[0]) is None
    assert "missing.png of dataset my_dataset" in caplog.text and "skipped" in caplog.text
    with pytest.raises(UnreadableImageError):  # evaluation never skips
        _mapper(is_train=False, skip_unreadable=True)(records[0])
    # The training loader (any Detectron2 version) then serves the readable image.
    loader = build_detection_train_loader(
        records, mapper=_mapper(skip_unreadable=True), total_batch_size=2, num_workers=0
    )
    batch = next(iter(loader))
    assert [d["file_name"] for d in batch] == [str(good)] * 2
