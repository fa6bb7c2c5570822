"""Masks through the DatasetMapper: the same resize, flip and crop as the boxes, BitMasks or
PolygonMasks by option, nothing paid for them in box-only training, clear refusals."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

from dino_d2.data import DatasetMapper, MissingMasksError, detr_train_augmentation
from dino_d2.data.digits import generate_digits_dataset

# A 40 x 60 image: flipped, resized to 80 x 120, then cropped to x 10..110, y 4..64.
_TRANSFORMS = [
    T.HFlipTransform(60),
    T.ResizeTransform(40, 60, 80, 120),
    T.CropTransform(10, 4, 100, 60),
]


class _NoCopy(list):
    """A segmentation that fails the test if it is deep-copied."""

    def __deepcopy__(self, memo):
        raise AssertionError("a box-only mapper deep-copied a segmentation")


def _image(tmp_path, height=40, width=60):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    return path


def _mapper(use_instance_mask=True, instance_mask_format="bitmask", augmentations=_TRANSFORMS):
    return DatasetMapper(
        is_train=True,
        augmentations=list(augmentations),
        image_format="RGB",
        use_instance_mask=use_instance_mask,
        instance_mask_format=instance_mask_format,
        dataset_name="masks_test",
    )


def _rectangle_rle(height=40, width=60):
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[10:20, 5:15] = 1
    return {"size": [height, width], "counts": mask_util.encode(mask)["counts"].decode("ascii")}


def _record(path, segmentations):
    annotations = []
    for k, segmentation in enumerate(segmentations):
        annotation = {"bbox": [5, 10, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": k}
        if segmentation is not None:
            annotation["segmentation"] = segmentation
        annotations.append(annotation)
    return {"file_name": str(path), "height": 40, "width": 60, "annotations": annotations}


def _expected_box():
    # x 5..15 -> flipped 45..55 -> doubled 90..110 -> cropped 80..100; y 10..20 -> 20..40 -> 16..36
    return [80.0, 16.0, 100.0, 36.0]


def test_bitmasks_follow_the_boxes_through_flip_resize_and_crop(tmp_path):
    mapped = _mapper()(_record(_image(tmp_path), [_rectangle_rle()]))
    instances = mapped["instances"]
    assert tuple(mapped["image"].shape) == (3, 60, 100)
    assert isinstance(instances.gt_masks, BitMasks)
    assert tuple(instances.gt_masks.tensor.shape) == (1, 60, 100)
    assert instances.gt_boxes.tensor.tolist() == [_expected_box()]
    assert instances.gt_masks.get_bounding_boxes().tensor.tolist() == [_expected_box()]
    assert int(instances.gt_masks.tensor.sum()) == 20 * 20


def test_polygons_follow_the_boxes_through_flip_resize_and_crop(tmp_path):
    polygon = [[5.0, 10.0, 15.0, 10.0, 15.0, 20.0, 5.0, 20.0]]
    record = _record(_image(tmp_path), [polygon])
    polygons = _mapper(instance_mask_format="polygon")(record)["instances"].gt_masks
    assert isinstance(polygons, PolygonMasks)
    np.testing.assert_allclose(polygons.get_bounding_boxes().tensor.tolist(), [_expected_box()])
    np.testing.assert_allclose(polygons.area().tolist(), [400.0])
    bitmasks = _mapper()(record)["instances"].gt_masks
    assert bitmasks.get_bounding_boxes().tensor.tolist() == [_expected_box()]
    assert record["annotations"][0]["segmentation"] == polygon  # the input is not changed


def test_box_only_mapping_never_copies_or_decodes_masks(tmp_path):
    record = _record(_image(tmp_path), [_NoCopy([[5.0, 10.0, 15.0, 10.0, 15.0, 20.0]])])
    mapped = _mapper(use_instance_mask=False)(record)
    assert not mapped["instances"].has("gt_masks")
    assert mapped["instances"].gt_boxes.tensor.tolist() == [_expected_box()]
    assert "segmentation" in record["annotations"][0]
    evaluation = DatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", use_instance_mask=True
    )(record)
    assert "annotations" not in evaluation and "instances" not in evaluation


def test_masks_asked_of_a_dataset_without_masks_are_refused(tmp_path):
    with pytest.raises(MissingMasksError, match=r"image\.png \(dataset masks_test\).*none of"):
        _mapper()(_record(_image(tmp_path), [None, None]))
    with pytest.raises(MissingMasksError, match="instance_mask_format='bitmask'"):
        _mapper(instance_mask_format="polygon")(_record(_image(tmp_path), [_rectangle_rle()]))


def test_an_annotation_without_a_mask_is_left_out_with_one_warning(tmp_path, caplog):
    mapper = _mapper()
    record = _record(_image(tmp_path), [None, _rectangle_rle()])
    with caplog.at_level("WARNING", logger="dino_d2.data.mapper"):
        first = mapper(record)
        mapper(record)
    assert first["instances"].gt_classes.tolist() == [1]
    assert sum("left out of mask training" in r.getMessage() for r in caplog.records) == 1


def test_digits_masks_stay_inside_their_boxes_under_the_demo_augmentation(tmp_path):
    from dino_d2.data.datasets import load_coco_format_json

    root = generate_digits_dataset(tmp_path / "digits", num_train=4, num_val=1, log_every=0)
    records = load_coco_format_json(
        f"{root}/annotations/train.json", f"{root}/train", "digits_masks_test"
    )
    augmentations = detr_train_augmentation(
        min_sizes=(176, 192, 208),
        max_size=320,
        crop_resize_sizes=(96, 120, 144),
        crop_size=(96, 144),
        horizontal_flip=False,
    )
    mapper = _mapper(augmentations=augmentations)
    np.random.seed(0)
    for _ in range(3):
        for record in records:
            instances = mapper(record)["instances"]
            masks, boxes = instances.gt_masks.tensor, instances.gt_boxes.tensor
            assert masks.shape[1:] == instances.image_size and len(masks) == len(boxes)
            mask_boxes = instances.gt_masks.get_bounding_boxes().tensor
            nonempty = masks.flatten(1).any(1)
            # Masks are resampled by nearest neighbour, boxes are scaled exactly: a pixel of
            # the downscale before the crop becomes up to 2 after the upscale, plus 1 after it.
            assert (mask_boxes[nonempty, :2] >= boxes[nonempty, :2] - 3).all()
            assert (mask_boxes[nonempty, 2:] <= boxes[nonempty, 2:] + 3).all()
            assert nonempty.float().mean() > 0.5
