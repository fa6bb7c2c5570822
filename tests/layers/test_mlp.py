import torch

from dino_d2.layers.mlp import MLP


def test_mlp_structure_and_forward():
    mlp = MLP(6, 5, 3, 3)
    assert [(l.in_features, l.out_features) for l in mlp.layers] == [(6, 5), (5, 5), (5, 3)]
    assert sorted(mlp.state_dict()) == [
        f"layers.{i}.{p}" for i in range(3) for p in ("bias", "weight")
    ]
    x = torch.randn(2, 4, 6)
    expected = x
    for i, layer in enumerate(mlp.layers):
        expected = layer(expected)
        if i < 2:
            expected = expected.clamp(min=0)
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_single_layer_is_linear():
    mlp = MLP(4, 99, 2, 1)
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp.layers[0](x))
