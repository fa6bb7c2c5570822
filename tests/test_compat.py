import importlib

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
