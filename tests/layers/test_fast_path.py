"""The CPU fast path as a transform (dino_d2.layers.fast_path): same state dict, same results,
modules still called as modules."""

import copy

import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from dino_d2.layers.fast_path import ChunkedFFN, OneDNNLinear, optimize_for_cpu_inference
from dino_d2.layers.ffn import FFN
from dino_d2.layers.frozen_bn import FrozenBNConv2d
from dino_d2.layers.mlp import MLP


class _Scaled(nn.Linear):
    """A Linear subclass (as a LoRA adapter or a quantized Linear is): never replaced."""

    def forward(self, x):
        return 2 * super().forward(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        conv = Conv2d(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8))
        with torch.no_grad():
            conv.norm.running_var.uniform_(0.5, 2.0)
            conv.norm.weight.uniform_(0.5, 1.5)
        self.backbone = nn.Sequential(conv)
        self.ffn = FFN(8, 32)
        self.mlp = MLP(8, 16, 4, 3)

    def forward(self, x):
        tokens = self.backbone(x).flatten(2).transpose(1, 2)
        return self.mlp(self.ffn(tokens))


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_onednn_linear_equals_the_plain_one_with_and_without_autograd(activation):
    torch.manual_seed(0)
    plain = nn.Linear(32, 48)
    fused = copy.deepcopy(plain)
    fused.__class__ = OneDNNLinear
    fused.activation = activation
    x = torch.randn(3, 40, 32).transpose(0, 1)  # any layout
    expected = plain(x) if activation == "none" else torch.relu(plain(x))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)  # autograd: F.linear
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_transform_keeps_the_state_dict_and_the_results():
    torch.manual_seed(0)
    plain = _Block().eval()
    fast = copy.deepcopy(plain)
    counts = optimize_for_cpu_inference(fast)
    assert counts == {
        "folded_batchnorms": 1,
        "fused_blocks": 0,
        "fused_relus": 3,
        "onednn_linears": 5,
        "chunked_ffns": 1,
    }
    assert type(fast.backbone[0]) is FrozenBNConv2d
    assert fast.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert type(fast.ffn) is ChunkedFFN
    assert type(fast.ffn.linear1) is OneDNNLinear and fast.ffn.linear1.activation == "relu"
    assert isinstance(fast.ffn.activation, nn.Identity)
    assert all(isinstance(a, nn.Identity) for a in fast.mlp.activations)
    assert fast.mlp.layers[-1].activation == "none"
    state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(fast_state) == list(state)
    assert all(torch.equal(state[k], fast_state[k]) for k in state)
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    # Under autograd the transformed modules run the plain ops: training is unaffected.
    out = fast(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert fast.ffn.linear1.weight.grad.abs().sum() > 0


def test_linear_subclasses_and_their_relus_are_left_alone():
    torch.manual_seed(0)
    plain = FFN(8, 32).eval()
    plain.linear1 = _Scaled(8, 32)
    fast = copy.deepcopy(plain)
    counts = optimize_for_cpu_inference(fast)
    assert counts["fused_relus"] == 0 and counts["onednn_linears"] == 1
    assert type(fast.linear1) is _Scaled and type(fast.activation) is nn.ReLU
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_exported_transformed_module_has_no_onednn_op():
    torch.manual_seed(0)
    plain = MLP(8, 16, 4, 3).eval()
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    x = torch.randn(5, 8)
    with torch.no_grad():
        program = torch.export.export(fast, (x,))
        expected = plain(x)
    assert "_linear_pointwise" not in str(program.graph)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


class _Wider(FFN):
    """An FFN subclass (someone's variant): never replaced."""


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_chunked_ffn_gives_the_plain_results_exactly(dtype):
    torch.manual_seed(0)
    plain = FFN(16, 64).eval()
    fast = copy.deepcopy(plain)
    assert optimize_for_cpu_inference(fast)["chunked_ffns"] == 1
    fast.chunk_tokens = 7
    # 2 x 37 tokens: ten blocks of 7 and one of 4; 13 tokens or fewer run in one block.
    unchunked = copy.deepcopy(fast)
    unchunked.__class__ = FFN  # the same fused linears, one block
    calls = []
    fast.linear2.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    x = torch.randn(2, 37, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        expected = unchunked(x)
        out = fast(x)
        assert calls == [7] * 10 + [4]
        calls.clear()
        fast(x[0, :14])
        assert calls == [14]
    assert out.shape == x.shape and out.dtype == expected.dtype
    assert torch.equal(out, expected)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    # Under autograd it is FFN.forward: one call for the whole (2, 37) batch.
    calls.clear()
    fast(x).sum().backward()
    assert calls == [2] and fast.linear1.weight.grad is not None


def test_ffn_subclasses_are_left_alone():
    fast = _Wider(8, 32).eval()
    assert optimize_for_cpu_inference(fast)["chunked_ffns"] == 0
    assert type(fast) is _Wider


def test_chunked_ffn_exports_with_a_dynamic_token_count():
    torch.manual_seed(0)
    plain = FFN(8, 32).eval()
    fast = copy.deepcopy(plain)
    optimize_for_cpu_inference(fast)
    fast.chunk_tokens = 4
    x = torch.randn(1, 30, 8)
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    with torch.no_grad():
        program = torch.export.export(fast, (x,), dynamic_shapes=({1: tokens},))
        for length in (3, 30, 57):
            y = torch.randn(1, length, 8)
            torch.testing.assert_close(program.module()(y), plain(y), rtol=1e-5, atol=1e-5)
    assert "split" not in str(program.graph)
