"""dino_d2.layers.fused_blocks: Detectron2's ResNet blocks with their ReLUs and residual adds run
inside oneDNN's convolutions give the plain blocks' results, in float32 and under bfloat16
autocast, and leave their inputs, state dicts and training alone."""

import copy

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from dino_d2.layers.fast_path import onednn_bfloat16_available, optimize_for_cpu_inference
from dino_d2.layers.fused_blocks import (
    FusedBasicBlock,
    FusedBasicStem,
    FusedBottleneckBlock,
    fuse_resnet_blocks,
)
from dino_d2.measure.parity import perturb_frozen_batchnorm

__all__ = []


def _resnet(depth):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    torch.manual_seed(0)
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    perturb_frozen_batchnorm(model)
    return model


def _ops(model, x, **autocast):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, **autocast):
        model(x)  # folded weights cached
        with torch.profiler.profile() as prof:
            out = model(x)
    return out, {event.name for event in prof.events()}


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_blocks_equal_the_plain_ones_in_float32(depth):
    plain = _resnet(depth)
    fast = copy.deepcopy(plain)
    counts = optimize_for_cpu_inference(fast)
    blocks = {18: 8, 50: 16}[depth]
    assert counts["fused_blocks"] == blocks + 1
    kinds = {type(m) for m in fast.modules()}
    assert FusedBasicStem in kinds
    assert (FusedBottleneckBlock if depth == 50 else FusedBasicBlock) in kinds
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.rand(1, 3, 64, 96) * 255
    x_before = x.clone()
    expected = plain(x)
    out, ops = _ops(fast, x, enabled=False)
    assert "aten::relu_" not in ops and "aten::add_" not in ops
    assert torch.equal(x, x_before)
    for name, feature in expected.items():
        torch.testing.assert_close(
            out[name], feature, rtol=1e-4, atol=1e-3 * feature.abs().max().item()
        )


@pytest.mark.skipif(not onednn_bfloat16_available(), reason="no oneDNN bfloat16 on this CPU")
def test_fused_blocks_under_bf16_autocast_match_autocast_on_the_plain_blocks():
    plain = _resnet(50)
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    x = torch.rand(1, 3, 64, 96) * 255
    expected, _ = _ops(plain, x)
    out, ops = _ops(fast, x)
    assert "aten::relu_" not in ops and "aten::add_" not in ops
    for name, feature in expected.items():
        assert out[name].dtype == torch.bfloat16
        scale = feature.float().abs().max()
        # Both are bfloat16 products; they round differently (a few bf16 units over 16 blocks).
        assert (out[name].float() - feature.float()).abs().max() <= 0.05 * scale, name


def test_without_onednn_bfloat16_the_blocks_run_the_plain_ops_under_bf16_autocast(monkeypatch):
    """A CPU without AVX-512, where oneDNN refuses bfloat16 convolutions (emulated here), runs
    the blocks' own ops under bfloat16 autocast, with the plain blocks' results."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    plain = _resnet(18)
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    x = torch.rand(1, 3, 64, 96) * 255
    expected, _ = _ops(plain, x)
    out, ops = _ops(fast, x)
    assert "mkldnn::_convolution_pointwise" not in ops and "aten::relu_" in ops
    for name, feature in expected.items():
        assert out[name].dtype == feature.dtype, name
        scale = feature.float().abs().max()
        assert (out[name].float() - feature.float()).abs().max() <= 0.05 * scale, name


def test_fused_blocks_run_the_plain_ops_under_autograd():
    plain = _resnet(18)
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    x = torch.rand(1, 3, 32, 32)
    out = fast(x)["res5"]
    torch.testing.assert_close(out, plain(x)["res5"], rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert fast.res5[0].conv2.weight.grad is not None  # (the stem and res2 are frozen)


def test_blocks_with_unfolded_convolutions_are_left_alone():
    plain = _resnet(18)
    assert fuse_resnet_blocks(plain) == 0
