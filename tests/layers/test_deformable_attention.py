"""Tests of the MultiScaleDeformableAttention module: backends agree, padding and batching,
initialisation, empty queries, and the levels it reads."""

import pytest
import torch
from test_ms_deform_attn import _assert_close

from dino_d2.layers import MultiScaleDeformableAttention, MultiScaleLevels
from dino_d2.layers.ms_deform_attn import BACKEND_ENV_VAR

__all__ = []


def _masks(n, level_shapes, padded_half=()):
    """One (N, H_l, W_l) padding mask per level; elements in ``padded_half`` are padded on the
    right half of every level."""
    masks = [torch.zeros(n, h, w, dtype=torch.bool) for h, w in level_shapes]
    for mask in masks:
        for i in padded_half:
            mask[i, :, mask.shape[2] // 2 :] = True
    return masks


def _module_inputs(module, n=2, q=5, level_shapes=((6, 5), (3, 3)), boxes=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    levels = MultiScaleLevels.from_masks(_masks(n, level_shapes))
    s = sum(h * w for h, w in level_shapes)
    c, num_levels = module.embed_dim, len(level_shapes)
    query = torch.randn(n, q, c, generator=gen)
    value = torch.randn(n, s, c, generator=gen)
    refs = torch.rand(n, q, num_levels, 4 if boxes else 2, generator=gen)
    return query, refs, value, levels


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_module_matches_reference_backend(boxes, monkeypatch):
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=12, num_heads=4, num_levels=2, num_points=3)
    # Non-trivial offsets and attention weights.
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
    query, refs, value, levels = _module_inputs(module, boxes=boxes)
    output = module(query, refs, value, levels)
    assert output.shape == query.shape
    output.sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    monkeypatch.setenv(BACKEND_ENV_VAR, "grid_sample")
    expected = module(query, refs, value, levels)
    _assert_close(output.detach(), expected.detach(), 1e-5)


def test_module_padding_mask_and_batching():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=2.0)
    query, refs, value, levels = _module_inputs(module, n=2)
    # Element 1 is padded on the right half of every level.
    masks = _masks(2, levels.shapes, padded_half=(1,))
    padded = MultiScaleLevels.from_masks(masks)
    mask = padded.padding_mask
    output = module(query, refs, value, padded)

    # Masked values never matter.
    changed = value.clone()
    changed[mask] = 1e3 * torch.randn(int(mask.sum()), value.shape[2])
    output_changed = module(query, refs, changed, padded)
    torch.testing.assert_close(output_changed, output, rtol=0, atol=0)
    # ... and the mask does: without it the padded element reads the changed values.
    assert not torch.allclose(module(query, refs, changed, levels)[1], output[1])

    # Batched equals one element at a time.
    for i in range(2):
        single_levels = MultiScaleLevels.from_masks([m[i : i + 1] for m in masks])
        single = module(query[i : i + 1], refs[i : i + 1], value[i : i + 1], single_levels)
        _assert_close(single, output[i : i + 1], 1e-6)


def test_module_initialisation():
    module = MultiScaleDeformableAttention(embed_dim=32, num_heads=8, num_levels=3, num_points=4)
    bias = module.sampling_offsets.bias.view(8, 3, 4, 2)
    assert module.sampling_offsets.weight.abs().sum() == 0
    # Point k of every head lies k + 1 times its unit-max direction away, the same on all levels.
    torch.testing.assert_close(bias[:, :, 3], 4 * bias[:, :, 0])
    torch.testing.assert_close(bias[:, 0], bias[:, 2])
    torch.testing.assert_close(bias[:, 0, 0].abs().max(dim=-1).values, torch.ones(8))
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[2, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert module.attention_weights.weight.abs().sum() == 0
    assert module.attention_weights.bias.abs().sum() == 0
    for proj in (module.value_proj, module.output_proj):
        assert proj.bias.abs().sum() == 0 and proj.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=8)


def test_module_zero_queries():
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
    query, refs, value, levels = _module_inputs(module, q=0)
    output = module(query.requires_grad_(), refs, value.requires_grad_(), levels)
    assert output.shape == (2, 0, 8)
    output.sum().backward()
    assert value.grad is not None and value.grad.abs().sum() == 0


def test_module_rejects_levels_of_another_count():
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
    query, refs, value, _ = _module_inputs(module)
    three = MultiScaleLevels.from_masks(_masks(2, ((6, 5), (3, 3), (1, 1))))
    with pytest.raises(ValueError, match="levels.spatial_shapes must have shape"):
        module(query, refs, value, three)
