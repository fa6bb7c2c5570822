"""The CPU fast path under bfloat16 autocast (dino_d2.layers.fast_path, .frozen_bn,
.inference_weights): oneDNN's bf16 matmul with the bias and ReLU fused, weights cast and folded
once and refreshed when they change, the same results as autocast on the plain modules."""

import copy

import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from dino_d2.layers.fast_path import (
    OneDNNLinear,
    onednn_bfloat16_available,
    optimize_for_cpu_inference,
)
from dino_d2.layers.inference_weights import derived_weight

__all__ = []

requires_onednn_bf16 = pytest.mark.skipif(
    not onednn_bfloat16_available(), reason="oneDNN has no bfloat16 matmul on this CPU"
)


def _autocast():
    return torch.autocast("cpu", torch.bfloat16)


@requires_onednn_bf16
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_onednn_linear_under_autocast_runs_bf16_like_autocast(activation):
    torch.manual_seed(0)
    plain = nn.Linear(64, 96)
    fused = copy.deepcopy(plain)
    fused.__class__ = OneDNNLinear
    fused.activation = activation
    x = torch.randn(50, 64)
    with torch.no_grad(), _autocast():
        expected = plain(x)
        expected = expected.relu() if activation == "relu" else expected
        with torch.profiler.profile() as prof:
            output = fused(x)
    assert output.dtype == torch.bfloat16
    names = [event.name for event in prof.events()]
    assert "mkldnn::_linear_pointwise" in names and "aten::relu" not in names
    # Both are bf16 products summed in float32; they may differ by a bf16 rounding.
    torch.testing.assert_close(output.float(), expected.float(), rtol=2**-7, atol=1e-2)


@requires_onednn_bf16
def test_bf16_weights_are_cast_once_and_refreshed_when_the_weight_changes():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.__class__ = OneDNNLinear
    x = torch.randn(4, 16)
    with torch.no_grad(), _autocast():
        layer(x)
        cached = layer._derived_weights["weight/torch.bfloat16"][1][0]
        layer(x)
        assert layer._derived_weights["weight/torch.bfloat16"][1][0] is cached
        layer.load_state_dict({"weight": 2 * layer.weight, "bias": layer.bias})
        output = layer(x)
    assert layer._derived_weights["weight/torch.bfloat16"][1][0] is not cached
    expected = nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
    torch.testing.assert_close(output, expected, rtol=2**-7, atol=1e-2)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_derived_weight_follows_in_place_writes_and_new_storages():
    layer = nn.Linear(3, 2)
    calls = []

    def compute():
        calls.append(1)
        return layer.weight * 2

    first = derived_weight(layer, "double", (layer.weight,), compute)
    assert derived_weight(layer, "double", (layer.weight,), compute) is first
    with torch.no_grad():
        layer.weight.add_(1)
    second = derived_weight(layer, "double", (layer.weight,), compute)
    torch.testing.assert_close(second, layer.weight.detach() * 2)
    layer.weight = nn.Parameter(layer.weight.detach().clone())
    derived_weight(layer, "double", (layer.weight,), compute)
    assert len(calls) == 3


def _folded_block():
    torch.manual_seed(0)
    conv = Conv2d(4, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8))
    with torch.no_grad():
        conv.norm.running_var.uniform_(0.5, 2.0)
        conv.norm.running_mean.uniform_(-1.0, 1.0)
    plain = nn.Sequential(conv).eval()
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    return plain, fast


@pytest.mark.parametrize("amp", [False, True])
def test_folded_convolution_is_folded_once_and_follows_new_statistics(amp):
    plain, fast = _folded_block()
    x = torch.randn(2, 4, 9, 7).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        fast(x)
        with torch.profiler.profile() as prof:
            output = fast(x)
        # Folded and cast on the first call only.
        assert "aten::mul" not in [event.name for event in prof.events()]
        for module in (plain, fast):
            module[0].norm.running_var.mul_(3.0)
        expected, output = plain(x), fast(x)
    assert output.dtype == (torch.bfloat16 if amp else torch.float32)
    tol = {"rtol": 2**-7, "atol": 2e-2} if amp else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(output.float(), expected.float(), **tol)


def test_folded_convolution_still_trains_under_autocast():
    plain, fast = _folded_block()
    x = torch.randn(2, 4, 9, 7)
    with _autocast():
        fast(x).float().square().sum().backward()
    grad = fast[0].weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
