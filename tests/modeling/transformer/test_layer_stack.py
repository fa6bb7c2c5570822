"""Layer stacks cloned from one prototype: independent parameters, the initialisation of layers
built one by one (same seed, same weights), and the deprecated layer keywords on the stacks."""

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate

from dino_d2.modeling.transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
)
from dino_d2.modeling.transformer.layer_stack import clone_layers, reset_module

__all__ = []

SMALL = dict(embed_dim=16, num_heads=2, ffn_dim=24, num_levels=2, num_points=2)
LAYER_TYPES = [DeformableEncoderLayer, DeformableDecoderLayer]


@pytest.mark.parametrize("layer_type", LAYER_TYPES, ids=["encoder", "decoder"])
def test_clones_equal_layers_built_one_by_one(layer_type):
    torch.manual_seed(0)
    clones = clone_layers(layer_type(**SMALL), 3)
    torch.manual_seed(0)
    built = [layer_type(**SMALL) for _ in range(3)]
    for clone, layer in zip(clones, built):
        assert clone.state_dict().keys() == layer.state_dict().keys()
        for name, value in layer.state_dict().items():
            assert torch.equal(clone.state_dict()[name], value), name


@pytest.mark.parametrize("layer_type", LAYER_TYPES, ids=["encoder", "decoder"])
def test_clones_share_nothing_and_differ(layer_type):
    prototype = layer_type(**SMALL)
    clones = clone_layers(prototype, 3)
    assert clones[0] is prototype
    pointers = [{p.data_ptr() for p in layer.parameters()} for layer in clones]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not pointers[i] & pointers[j]
            # Every matrix is drawn again (the deformable attention's offsets are fixed by design).
            first, second = clones[i].ffn.linear1.weight, clones[j].ffn.linear1.weight
            assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        clone_layers(prototype, 0)


def test_reset_module_runs_every_initialisation():
    layer = DeformableDecoderLayer(**SMALL)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.fill_(7.0)
    reset_module(layer)
    # Deformable DETR's offsets bias (head 0 points along +x), zero attention weights, xavier
    # matrices, zero self-attention biases, unit norms.
    torch.testing.assert_close(layer.cross_attn.sampling_offsets.bias[:2], torch.tensor([1.0, 0]))
    assert layer.cross_attn.attention_weights.weight.abs().sum() == 0
    assert layer.self_attn.in_proj_bias.abs().sum() == 0
    assert layer.ffn.linear1.weight.abs().max() < 1.0
    assert torch.equal(layer.cross_attn_norm.weight, torch.ones(16))


def test_stacks_take_a_layer_and_declare_its_sizes():
    encoder = DeformableEncoder(layer=DeformableEncoderLayer(**SMALL), num_layers=2)
    decoder = DeformableDecoder(num_classes=3, layer=DeformableDecoderLayer(**SMALL), num_layers=3)
    assert (encoder.embed_dim, encoder.num_levels, len(encoder.layers)) == (16, 2, 2)
    assert (decoder.embed_dim, decoder.num_layers, len(decoder.class_embed)) == (16, 3, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        DeformableDecoder(
            num_classes=3,
            layer=DeformableDecoderLayer(**{**SMALL, "embed_dim": 18, "num_heads": 3}),
        )


def test_deprecated_layer_keywords_build_the_same_stack():
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"layer=DeformableEncoderLayer\(\.\.\.\)"):
        old = DeformableEncoder(num_layers=2, **SMALL)
    torch.manual_seed(0)
    new = DeformableEncoder(layer=DeformableEncoderLayer(**SMALL), num_layers=2)
    assert old.state_dict().keys() == new.state_dict().keys()
    for name, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[name], value), name
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['ffn_size'\]"):
        DeformableDecoder(num_classes=3, layer=DeformableDecoderLayer(**SMALL), ffn_size=8)


def test_deprecated_config_key_overrides_the_layer():
    cfg = L(DeformableDecoder)(
        num_classes=3, layer=L(DeformableDecoderLayer)(**SMALL), num_layers=2
    )
    cfg.ffn_dim = 40  # the key before layer=: now decoder.layer.ffn_dim
    with pytest.warns(DeprecationWarning, match="deprecated"):
        decoder = instantiate(cfg)
    assert all(
        layer.ffn_dim == 40 and layer.ffn.linear1.out_features == 40 for layer in decoder.layers
    )
    assert all(layer.num_heads == 2 for layer in decoder.layers)
