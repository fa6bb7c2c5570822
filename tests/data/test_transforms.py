import pickle

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from dino_d2.data.transforms import RandomChoice, detr_test_augmentation, detr_train_augmentation

_MIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
# Three filled rectangles, one per colour channel, on a black 240x320 image (XYXY, pixels).
_HEIGHT, _WIDTH = 240, 320
_BOXES = np.array([[10, 20, 90, 120], [150, 40, 300, 100], [60, 150, 200, 230]], dtype=np.float32)


def _rectangles_image():
    image = np.zeros((_HEIGHT, _WIDTH, 3), dtype=np.uint8)
    for channel, (x0, y0, x1, y1) in enumerate(_BOXES.astype(int)):
        image[y0:y1, x0:x1, channel] = 255
    return image


def _colour_box(image, channel):
    """XYXY box of the pixels that are mostly ``channel``'s colour, or None."""
    others = [c for c in range(3) if c != channel]
    mask = (image[:, :, channel] > 127) & (image[:, :, others] < 128).all(axis=2)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _branch_taken(transforms):
    return "crop" if any(isinstance(t, T.CropTransform) for t in transforms) else "resize"


@pytest.mark.parametrize("seed", range(16))
def test_boxes_follow_the_image_in_both_branches(seed):
    np.random.seed(seed)
    aug_input = T.AugInput(_rectangles_image(), boxes=_BOXES.copy())
    transforms = T.AugmentationList(detr_train_augmentation())(aug_input)
    image = aug_input.image
    height, width = image.shape[:2]
    # The final resize of both branches gives one of the DETR sizes (or the longer side limit).
    assert min(height, width) in _MIN_SIZES or max(height, width) == 1333
    # What transform_instance_annotations does: clip to the augmented image.
    boxes = aug_input.boxes.clip(min=0)
    boxes = np.minimum(boxes, [width, height, width, height])
    assert np.allclose(transforms.apply_box(_BOXES), aug_input.boxes)
    for channel, box in enumerate(boxes):
        found = _colour_box(image, channel)
        if found is None:
            # Cropped away (or to a sliver thinner than the interpolation blur).
            assert min(box[2] - box[0], box[3] - box[1]) < 3
        else:
            assert np.abs(found - box).max() <= 1.0, (seed, channel, found, box)


def test_both_branches_are_chosen_and_reproducible():
    def branches(seed):
        np.random.seed(seed)
        taken = []
        for _ in range(40):
            aug_input = T.AugInput(_rectangles_image(), boxes=_BOXES.copy())
            taken.append(_branch_taken(T.AugmentationList(detr_train_augmentation())(aug_input)))
        return taken

    taken = branches(0)
    assert {"crop", "resize"} == set(taken)
    assert 8 <= taken.count("crop") <= 32
    assert taken == branches(0)


def test_random_choice_probabilities_and_bare_transforms():
    choice = RandomChoice(
        [[T.HFlipTransform(_WIDTH)], T.VFlipTransform(_HEIGHT)], probabilities=(0.25, 0.75)
    )
    np.random.seed(0)
    kinds = []
    for _ in range(400):
        transforms = choice(T.AugInput(_rectangles_image()))
        assert isinstance(transforms, T.TransformList) and len(transforms.transforms) == 1
        kinds.append(type(transforms.transforms[0]))
    assert set(kinds) == {T.HFlipTransform, T.VFlipTransform}
    assert 60 <= kinds.count(T.HFlipTransform) <= 140

    always_first = RandomChoice([[T.HFlipTransform(_WIDTH)], [T.VFlipTransform(_HEIGHT)]], [1, 0])
    for _ in range(20):
        transforms = always_first(T.AugInput(_rectangles_image()))
        assert isinstance(transforms.transforms[0], T.HFlipTransform)


def test_random_choice_applies_the_chosen_branch_in_place():
    image = _rectangles_image()
    aug_input = T.AugInput(image.copy(), boxes=_BOXES.copy())
    T.AugmentationList([RandomChoice([[T.HFlipTransform(_WIDTH), T.NoOpTransform()]])])(aug_input)
    assert np.array_equal(aug_input.image, image[:, ::-1])
    expected = np.stack([_WIDTH - _BOXES[:, 2], _BOXES[:, 1], _WIDTH - _BOXES[:, 0], _BOXES[:, 3]])
    assert np.allclose(aug_input.boxes, expected.T)


def test_random_choice_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sum to 1"):
        RandomChoice([[T.NoOpTransform()], [T.NoOpTransform()]], probabilities=(0.5, 0.6))
    with pytest.raises(ValueError, match="2 branches but 1"):
        RandomChoice([[T.NoOpTransform()], [T.NoOpTransform()]], probabilities=(1.0,))
    with pytest.raises(ValueError, match="at least one"):
        RandomChoice([])
    with pytest.raises(TypeError, match="Augmentation or a Transform"):
        RandomChoice([["resize"]])
    with pytest.raises(NotImplementedError):
        RandomChoice([[T.NoOpTransform()]]).get_transform(_rectangles_image())


def test_policies_pickle_and_print():
    augmentations = detr_train_augmentation() + [RandomChoice([T.NoOpTransform()])]
    restored = pickle.loads(pickle.dumps(T.AugmentationList(augmentations)))
    assert isinstance(restored.augs[1], RandomChoice)
    text = repr(augmentations[1])
    assert text.startswith("RandomChoice([") and "RandomCrop" in text and "0.5" in text


def test_without_flip_and_without_crop():
    augmentations = detr_train_augmentation(horizontal_flip=False, crop_prob=0.0)
    assert isinstance(augmentations[0], RandomChoice) and len(augmentations) == 1
    np.random.seed(0)
    for _ in range(10):
        aug_input = T.AugInput(_rectangles_image())
        transforms = T.AugmentationList(augmentations)(aug_input)
        assert _branch_taken(transforms) == "resize"
        assert not any(isinstance(t, T.HFlipTransform) for t in transforms)


def _dataset_dict(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(_rectangles_image()).save(path)
    annotations = [
        {
            "bbox": BoxMode.convert(box.tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": channel,
            "iscrowd": 0,
        }
        for channel, box in enumerate(_BOXES)
    ]
    return {
        "file_name": str(path),
        "height": _HEIGHT,
        "width": _WIDTH,
        "image_id": 7,
        "annotations": annotations,
    }


def test_detectron2_dataset_mapper_train(tmp_path):
    dataset_dict = _dataset_dict(tmp_path)
    mapper = DatasetMapper(
        is_train=True, augmentations=detr_train_augmentation(), image_format="RGB"
    )
    np.random.seed(3)
    for _ in range(6):
        out = mapper(dataset_dict)
        image = out["image"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        height, width = image.shape[1:]
        instances = out["instances"]
        assert instances.image_size == (height, width)
        boxes = instances.gt_boxes.tensor
        assert len(boxes) >= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
        # Each box still frames its rectangle in the mapped image.
        hwc = image.permute(1, 2, 0).numpy()
        for box, label in zip(boxes.numpy(), instances.gt_classes.tolist()):
            found = _colour_box(hwc, label)
            if found is not None:
                assert np.abs(found - box).max() <= 1.0
    assert dataset_dict["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS  # input untouched


def test_detectron2_dataset_mapper_test(tmp_path):
    mapper = DatasetMapper(
        is_train=False, augmentations=detr_test_augmentation(), image_format="RGB"
    )
    out = mapper(_dataset_dict(tmp_path))
    assert tuple(out["image"].shape) == (3, 800, 1067)
    assert "instances" not in out and "annotations" not in out
    aug_input = T.AugInput(_rectangles_image())
    T.AugmentationList(detr_test_augmentation(min_size=400, max_size=500))(aug_input)
    assert aug_input.image.shape[:2] == (375, 500)  # the longer side limit binds


def test_lazy_config_instantiates_and_saves(tmp_path):
    cfg = L(DatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentation)(
            min_sizes=[320, 352], max_size=600, crop_resize_sizes=[200, 250], crop_size=[180, 240]
        ),
        image_format="RGB",
    )
    path = tmp_path / "mapper.yaml"
    LazyConfig.save(cfg, str(path))
    for config in (cfg, LazyConfig.load(str(path))):
        mapper = instantiate(config)
        choice = mapper.augmentations.augs[1]
        resize_branch, crop_branch = choice.branches
        assert resize_branch.augs[0].short_edge_length == (320, 352)
        assert crop_branch.augs[1].crop_size == (180, 240)
        out = mapper(_dataset_dict(tmp_path))
        assert min(out["image"].shape[1:]) in (320, 352)
