import pytest
import torch

from dino_d2.layers.ffn import FFN
from dino_d2.layers.linear import linear, onednn_linear


def test_ffn_is_the_post_norm_relu_block_with_and_without_autograd():
    torch.manual_seed(0)
    ffn = FFN(16, 64)
    x = torch.randn(2, 25, 16)
    expected = ffn.norm(x + ffn.linear2(torch.relu(ffn.linear1(x))))
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    out = ffn(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and ffn.linear1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", [None, "relu"])
def test_fused_linear_equals_the_plain_one(activation):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    x = torch.randn(3, 40, 32).transpose(0, 1)  # any layout
    expected = layer(x)
    if activation == "relu":
        expected = torch.relu(expected)
    with torch.no_grad():
        fused = linear(x, layer.weight, layer.bias, activation)
        with onednn_linear(False):
            plain = linear(x, layer.weight, layer.bias, activation)
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        linear(x, layer.weight, layer.bias, "gelu")
