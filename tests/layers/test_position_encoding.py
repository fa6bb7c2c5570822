import math

import pytest
import torch

from dino_d2.layers.position_encoding import PositionEmbeddingSine, get_sine_pos_embed


def _sine_block(value, num_feats, temperature):
    """Hand computation of one coordinate's channels: sin on even, cos on odd channels."""
    out = []
    for k in range(num_feats):
        angle = value / temperature ** (2 * (k // 2) / num_feats)
        out.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
    return out


@pytest.mark.parametrize("temperature,offset", [(20, 0.0), (10000, -0.5)])
def test_matches_hand_computation_on_tiny_padded_mask(temperature, offset):
    # One image of 2 x 3 pixels whose last column is padding: valid extent 2 x 2.
    mask = torch.tensor([[[False, False, True], [False, False, True]]])
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=temperature, offset=offset)
    out = pe(mask)
    assert out.shape == (1, 8, 2, 3)
    eps, scale = 1e-6, 2 * math.pi
    for i in range(2):
        for j in range(2):
            y = (i + 1 + offset) / (2 + eps) * scale
            x = (j + 1 + offset) / (2 + eps) * scale
            expected = _sine_block(y, 4, temperature) + _sine_block(x, 4, temperature)
            torch.testing.assert_close(out[0, :, i, j], torch.tensor(expected), atol=1e-6, rtol=0)


def test_valid_region_does_not_depend_on_padding():
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature=20)
    alone = pe(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(2, 5, 7, dtype=torch.bool)
    padded_mask[0, :3, :4] = False
    padded_mask[1, :5, :6] = False
    batched = pe(padded_mask)
    torch.testing.assert_close(batched[0, :, :3, :4], alone[0], atol=1e-6, rtol=0)
    other = pe(torch.zeros(1, 5, 6, dtype=torch.bool))
    torch.testing.assert_close(batched[1, :, :5, :6], other[0], atol=1e-6, rtol=0)


def test_unnormalized_uses_pixel_counts():
    pe = PositionEmbeddingSine(num_pos_feats=2, temperature=10000, normalize=False)
    out = pe(torch.zeros(1, 1, 3, dtype=torch.bool))
    # y = 1 everywhere, x = 1, 2, 3.
    expected_x = torch.tensor([[math.sin(x) for x in (1, 2, 3)], [math.cos(x) for x in (1, 2, 3)]])
    torch.testing.assert_close(out[0, 2:, 0], expected_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, 0], torch.full((3,), math.sin(1.0)), atol=1e-6, rtol=0)


def test_sine_pos_embed_shape_and_order():
    boxes = torch.rand(2, 5, 4)
    out = get_sine_pos_embed(boxes, num_pos_feats=16, temperature=10000)
    assert out.shape == (2, 5, 64)
    single = [get_sine_pos_embed(boxes[..., i : i + 1], num_pos_feats=16) for i in range(4)]
    # The authors' order: y, x, w, h.
    expected = torch.cat([single[1], single[0], single[2], single[3]], -1)
    torch.testing.assert_close(out, expected)

    points = boxes[..., :2]
    out2 = get_sine_pos_embed(points, num_pos_feats=16)
    assert out2.shape == (2, 5, 32)
    torch.testing.assert_close(out2, torch.cat([single[1], single[0]], -1))


def test_sine_pos_embed_hand_computation():
    value = 0.3
    out = get_sine_pos_embed(torch.tensor([[value]]), num_pos_feats=6, temperature=20)
    expected = _sine_block(value * 2 * math.pi, 6, 20)
    torch.testing.assert_close(out[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_odd_num_pos_feats_rejected():
    with pytest.raises(ValueError):
        PositionEmbeddingSine(num_pos_feats=5)
