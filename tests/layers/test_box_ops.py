import math

import torch

from dino_d2.layers.box_ops import inverse_sigmoid


def test_inverse_sigmoid_inverts_sigmoid_inside_clamp():
    x = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=0)


def test_inverse_sigmoid_clamps_like_the_authors():
    x = torch.tensor([-1.0, 0.0, 1e-5, 0.5, 1 - 1e-5, 1.0, 2.0])
    bound = math.log(1 / 1e-3)
    expected = torch.tensor([-bound, -bound, -bound, 0.0, bound, bound, bound])
    torch.testing.assert_close(inverse_sigmoid(x), expected, atol=1e-4, rtol=0)
    # eps bounds x and 1 - x separately: x = 0.0005 gives log(eps / (1 - 0.0005)).
    torch.testing.assert_close(
        inverse_sigmoid(torch.tensor([5e-4])), torch.tensor([math.log(1e-3 / (1 - 5e-4))])
    )
    assert torch.isfinite(inverse_sigmoid(torch.tensor([float("inf"), -float("inf")]))).all()


def test_inverse_sigmoid_gradient_zero_when_clamped():
    x = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    inverse_sigmoid(x).sum().backward()
    assert x.grad[0] == 0 and x.grad[2] == 0
    torch.testing.assert_close(x.grad[1], torch.tensor(4.0))
