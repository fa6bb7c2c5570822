"""Tests of the timm ``features_only`` backbone adapter (random weights, CPU)."""

import math

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import FPN
from torch import nn

from dino_d2.modeling.backbone import TimmBackbone


@pytest.mark.parametrize(
    "model_name, out_indices, expected",
    [
        ("resnet18", (2, 3, 4), {"res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}),
        ("convnext_atto", (1, 2, 3), {"res3": (80, 8), "res4": (160, 16), "res5": (320, 32)}),
        (
            "mobilenetv3_small_050",
            (0, 1, 2, 3, 4),
            {"res1": (16, 2), "res2": (8, 4), "res3": (16, 8), "res4": (24, 16), "res5": (288, 32)},
        ),
    ],
)
def test_features_are_named_by_stride(model_name, out_indices, expected):
    backbone = TimmBackbone(model_name=model_name, out_indices=out_indices).eval()
    shapes = backbone.output_shape()
    assert shapes == {name: ShapeSpec(channels=c, stride=s) for name, (c, s) in expected.items()}

    height, width = 70, 101
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, height, width))
    assert list(outputs) == list(expected)
    for name, output in outputs.items():
        stride = shapes[name].stride
        assert output.shape[:2] == (2, shapes[name].channels)
        assert height // stride <= output.shape[2] <= math.ceil(height / stride)
        assert width // stride <= output.shape[3] <= math.ceil(width / stride)


def test_channels_last_features_become_nchw():
    backbone = TimmBackbone(
        model_name="swin_tiny_patch4_window7_224",
        out_indices=(1, 2, 3),
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        strict_img_size=False,
    ).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 96))
    for name, shape in backbone.output_shape().items():
        assert outputs[name].shape == (1, shape.channels, 64 // shape.stride, 96 // shape.stride)


def test_frozen_bn():
    backbone = TimmBackbone(model_name="resnet18", out_indices=(2, 3, 4), frozen_bn=True)
    modules = list(backbone.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        train_outputs = backbone.train()(images)
        eval_outputs = backbone.eval()(images)
    for name in train_outputs:
        torch.testing.assert_close(train_outputs[name], eval_outputs[name])


def test_repeated_strides_are_rejected():
    with pytest.raises(ValueError, match="distinct strides"):
        TimmBackbone(model_name="resnet18", out_indices=(2, 3, 4), output_stride=8)


def test_feeds_a_detectron2_fpn():
    backbone = TimmBackbone(model_name="resnet18", out_indices=(2, 3, 4))
    fpn = FPN(bottom_up=backbone, in_features=["res3", "res4", "res5"], out_channels=16).eval()
    with torch.no_grad():
        outputs = fpn(torch.randn(1, 3, 64, 96))
    assert {name: tuple(o.shape) for name, o in outputs.items()} == {
        "p3": (1, 16, 8, 12),
        "p4": (1, 16, 4, 6),
        "p5": (1, 16, 2, 3),
    }
