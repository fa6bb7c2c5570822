import importlib

import pytest
import torch

from dino_d2 import _compat


def test_fast_coco_eval_matches_the_extension():
    try:
        extension = importlib.import_module("detectron2._C")
    except ImportError:
        extension = None
    expected = extension is not None and hasattr(extension, "COCOevalEvaluateImages")
    assert _compat.fast_coco_eval_available() == expected


def test_collect_env_info_never_raises():
    info = _compat.collect_env_info()
    assert "PyTorch" in info and "detectron2" in info


def test_run_after_backward_hooks_calls_the_stage_when_present():
    calls = []

    class WithStage:
        def after_backward(self):
            calls.append("after_backward")

    _compat.run_after_backward_hooks(WithStage())
    _compat.run_after_backward_hooks(object())
    assert calls == ["after_backward"]


def test_image_list_padding_constraints():
    images = [torch.ones(3, 5, 7), torch.ones(3, 6, 4)]
    plain = _compat.image_list_from_tensors(images, 4)
    assert plain.tensor.shape == (2, 3, 8, 8) and plain.image_sizes == [(5, 7), (6, 4)]
    divisible = _compat.image_list_from_tensors(
        images, 4, padding_constraints={"size_divisibility": 3}
    )
    assert divisible.tensor.shape == (2, 3, 6, 9)
    square = _compat.image_list_from_tensors(
        images, 0, pad_value=-1.0, padding_constraints={"square_size": 10}
    )
    assert square.tensor.shape == (2, 3, 10, 10) and square.image_sizes == [(5, 7), (6, 4)]
    assert square.tensor[0, :, :5, :7].eq(1).all() and square.tensor[0, :, 5:].eq(-1).all()


@pytest.mark.parametrize("key", ["size_divisibility", "size_divisiblity"])
def test_padding_constraints_divisibility_in_either_spelling(key):
    """Detectron2 main's SimpleFeaturePyramid declares ``size_divisiblity``."""
    images = [torch.ones(3, 70, 90), torch.ones(3, 40, 100)]
    padded = _compat.image_list_from_tensors(images, 0, padding_constraints={key: 32})
    assert padded.tensor.shape == (2, 3, 96, 128)
    assert padded.image_sizes == [(70, 90), (40, 100)]
    assert padded.tensor[0, :, :70, :90].eq(1).all() and padded.tensor[0, :, 70:].eq(0).all()


def test_vitdet_parts_follow_the_installed_detectron2():
    if _compat.detectron2_has_vitdet():
        from detectron2.modeling.backbone import vit

        assert _compat.ViT is vit.ViT and _compat.SimpleFeaturePyramid is vit.SimpleFeaturePyramid
    else:
        for name in ("ViT", "SimpleFeaturePyramid"):
            with pytest.raises(ImportError, match=f"{name} .* only in Detectron2 main"):
                getattr(_compat, name)(in_feature="last_feat")


def _none_for_even(x):
    return None if x % 2 == 0 else x


def test_train_loader_replaces_skipped_images_by_unskipped_ones():
    mapped = _compat._SkippingMapDataset(list(range(1000)), _none_for_even)
    drawn = [mapped[i] for i in range(0, 1000, 2)]  # every request hits a skipped element
    assert all(x % 2 == 1 for x in drawn)
    assert len(set(drawn)) > 100  # drawn at random, not one fixed stand-in
    # Only the skipped indices are remembered, not every index of the dataset.
    assert mapped._skipped <= set(range(0, 1000, 2)) and len(mapped._skipped) >= 500
    assert mapped[3] == 3 and len(mapped) == 1000


def test_train_loader_draws_among_the_few_left_when_most_are_skipped():
    mapped = _compat._SkippingMapDataset(list(range(9)), lambda x: x if x == 7 else None)
    assert {mapped[i] for i in range(9)} == {7}
    with pytest.raises(RuntimeError, match="skipped every element"):
        _compat._SkippingMapDataset([0, 2, 4], _none_for_even)[0]
