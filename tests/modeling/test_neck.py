import pytest
import torch

from detectron2.modeling.backbone import BasicStem, ResNet

from dino_d2.modeling.neck import ChannelMapper


def _resnet18(out_features=("res2", "res3", "res4", "res5")):
    stem = BasicStem(in_channels=3, out_channels=64, norm="BN")
    stages = ResNet.make_default_stages(depth=18, norm="BN")
    return ResNet(stem, stages, out_features=list(out_features))


@pytest.mark.parametrize(
    "in_features,extra",
    [(["res3", "res4", "res5"], 1), (["res2", "res3", "res4", "res5"], 1), (["res5"], 2)],
)
def test_output_shapes_follow_the_backbone(in_features, extra):
    neck = ChannelMapper(
        bottom_up=_resnet18(), in_features=in_features, out_channels=64, num_extra_levels=extra
    )
    shapes = neck.output_shape()
    assert len(shapes) == len(in_features) + extra
    strides = [s.stride for s in shapes.values()]
    assert strides == sorted(strides) and all(
        b == 2 * a for a, b in zip(strides[len(in_features) - 1 :], strides[len(in_features) :])
    )
    x = torch.randn(2, 3, 70, 101)
    out = neck(x)
    # Its levels, after its inputs under their own names (for the heads that read them).
    inputs = neck.bottom_up.output_shape()
    assert list(out) == [*inputs, *shapes]
    for name in inputs:
        assert out[name].shape[1] == inputs[name].channels
    for name, feature in ((name, out[name]) for name in shapes):
        stride = shapes[name].stride
        assert feature.shape == (2, 64, -(-70 // stride), -(-101 // stride))


def test_extra_level_reads_the_raw_backbone_feature():
    neck = ChannelMapper(
        bottom_up=_resnet18(),
        in_features=["res4", "res5"],
        out_channels=32,
        num_extra_levels=1,
        num_groups=8,
    )
    assert neck.extra_convs[0][0].in_channels == neck.bottom_up.output_shape()["res5"].channels


def test_unknown_feature_is_a_clear_error():
    with pytest.raises(ValueError, match="res6"):
        ChannelMapper(bottom_up=_resnet18(), in_features=["res5", "res6"])
