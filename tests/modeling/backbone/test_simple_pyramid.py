"""ViTDet's simple feature pyramid over a timm ViT (random weights, CPU)."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from torch import nn

from dino_d2.modeling.backbone import SimplePyramid, TimmBackbone
from dino_d2.modeling.neck import ChannelMapper


def _tiny_vit(**kwargs):
    """A two-block, 64-wide ViT/16 from timm through features_only (stride 16, named res4)."""
    return TimmBackbone(
        model_name="vit_tiny_patch16_224",
        out_indices=(-1,),
        depth=2,
        embed_dim=64,
        num_heads=2,
        dynamic_img_size=True,
        **kwargs,
    )


class _Single(Backbone):
    """A stand-in single-feature backbone: a strided convolution."""

    def __init__(self, channels=8, stride=16, divisibility=0):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, stride, stride=stride)
        self._out_features = ["x"]
        self._out_feature_channels = {"x": channels}
        self._out_feature_strides = {"x": stride}
        self._divisibility = divisibility

    @property
    def size_divisibility(self):
        return self._divisibility

    def forward(self, x):
        return {"x": self.conv(x)}


@pytest.mark.parametrize(
    "scale_factors, strides, divisibility",
    [
        ((2.0, 1.0, 0.5), (8, 16, 32), 32),
        ((4.0, 2.0, 1.0, 0.5), (4, 8, 16, 32), 32),
        ((4.0, 2.0), (4, 8), 16),
        ((1.0, 0.5, 0.25), (16, 32, 64), 64),
    ],
)
def test_levels_have_the_declared_strides(scale_factors, strides, divisibility):
    pyramid = SimplePyramid(
        net=_tiny_vit(), in_feature="res4", out_channels=32, scale_factors=scale_factors
    ).eval()
    shapes = pyramid.output_shape()
    assert shapes == {f"p{s.bit_length() - 1}": ShapeSpec(channels=32, stride=s) for s in strides}
    assert pyramid.size_divisibility == divisibility

    # Any multiple of size_divisibility gives every level exactly H / stride x W / stride.
    height, width = 2 * divisibility, 3 * divisibility
    with torch.no_grad():
        outputs = pyramid(torch.randn(2, 3, height, width))
    assert list(outputs) == list(shapes)
    for name, output in outputs.items():
        stride = shapes[name].stride
        assert output.shape == (2, 32, height // stride, width // stride)


def test_output_shape_is_detectron2s_default():
    assert "output_shape" not in vars(SimplePyramid)


def test_size_divisibility_covers_the_net():
    pyramid = SimplePyramid(net=_Single(divisibility=64), in_feature="x", scale_factors=(2.0, 1.0))
    assert pyramid.size_divisibility == 64
    pyramid = SimplePyramid(net=_Single(stride=32), in_feature="x", scale_factors=(4.0, 2.0))
    assert pyramid.size_divisibility == 32


def test_upsampling_halves_the_channels_and_norms_between_deconvolutions():
    pyramid = SimplePyramid(net=_Single(channels=16), in_feature="x", scale_factors=(4.0, 1.0))
    deconvs = [m for m in pyramid.levels["p2"] if isinstance(m, nn.ConvTranspose2d)]
    assert [(d.in_channels, d.out_channels) for d in deconvs] == [(16, 8), (8, 4)]
    kinds = [type(m).__name__ for m in pyramid.levels["p2"]]
    assert kinds[:4] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in pyramid.levels["p4"])


@pytest.mark.parametrize("norm, bias", [("LN", False), ("GN", False), ("", True)])
def test_norm_choices(norm, bias):
    pyramid = SimplePyramid(
        net=_Single(channels=64),
        in_feature="x",
        out_channels=64,
        scale_factors=(4.0, 0.5),
        norm=norm,
    ).eval()
    convs = [
        m for m in pyramid.modules() if type(m).__name__ == "Conv2d" and m.kernel_size != (16, 16)
    ]
    assert len(convs) == 4 and all((c.bias is not None) == bias for c in convs)
    with torch.no_grad():
        outputs = pyramid(torch.randn(1, 3, 64, 64))
    assert {n: tuple(o.shape) for n, o in outputs.items()} == {
        "p2": (1, 64, 16, 16),
        "p5": (1, 64, 2, 2),
    }


def test_batched_equals_one_by_one():
    torch.manual_seed(0)
    pyramid = SimplePyramid(net=_tiny_vit(), in_feature="res4", out_channels=16).eval()
    images = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        batched = pyramid(images)
        single = [pyramid(images[i : i + 1]) for i in range(3)]
    for name, output in batched.items():
        torch.testing.assert_close(output, torch.cat([s[name] for s in single]))


def test_position_embedding_follows_the_image_size():
    """dynamic_img_size: the same ViT runs at several sizes, no 224x224 requirement."""
    pyramid = SimplePyramid(net=_tiny_vit(), in_feature="res4", out_channels=16).eval()
    with torch.no_grad():
        for height, width in [(32, 32), (64, 160), (256, 96)]:
            outputs = pyramid(torch.randn(1, 3, height, width))
            assert outputs["p5"].shape[-2:] == (height // 32, width // 32)


def test_gradient_reaches_every_parameter():
    pyramid = SimplePyramid(net=_tiny_vit(), in_feature="res4", out_channels=16)
    outputs = pyramid(torch.randn(2, 3, 64, 64))
    sum(o.square().mean() for o in outputs.values()).backward()
    missing = [n for n, p in pyramid.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_feeds_the_dino_neck():
    neck = ChannelMapper(
        bottom_up=SimplePyramid(net=_tiny_vit(), in_feature="res4", out_channels=32),
        in_features=["p3", "p4", "p5"],
        out_channels=32,
        num_extra_levels=1,
        num_groups=8,
    ).eval()
    assert neck.size_divisibility == 32
    assert {n: s.stride for n, s in neck.output_shape().items()} == {
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    with torch.no_grad():
        outputs = neck(torch.randn(1, 3, 64, 128))
    assert outputs["p6"].shape == (1, 32, 1, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_feature="res5"), "'res5' is not an output"),
        (dict(in_feature="x", scale_factors=(1.0, 2.0)), "strictly decreasing"),
        (dict(in_feature="x", scale_factors=()), "strictly decreasing"),
        (dict(in_feature="x", scale_factors=(3.0, 1.0)), "3.0 is not a power of two"),
        (dict(in_feature="x", scale_factors=(32.0,)), "below stride 1"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimplePyramid(net=_Single(), **kwargs)


def test_odd_channels_cannot_be_halved():
    with pytest.raises(ValueError, match="6 channels cannot be halved 2 times"):
        SimplePyramid(net=_Single(channels=6), in_feature="x", scale_factors=(4.0,))


def test_stride_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="stride 14"):
        SimplePyramid(net=_Single(stride=14), in_feature="x")
