import torch

from dino_d2.layers.ffn import FFN


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
