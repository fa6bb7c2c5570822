"""bfloat16 inference keeps its activations in bfloat16 (dino_d2.layers.precision): inside an
encoder or decoder layer of the fast path under autocast nothing is converted to or from float32
on every call, LayerNorm on bfloat16 keeps float32 statistics, and the detections stay paired
with float32's."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detectron2.config import instantiate

from dino_d2.layers.fast_path import onednn_bfloat16_available, optimized_copy
from dino_d2.layers.precision import inference_activations
from dino_d2.measure.parity import perturb_frozen_batchnorm
from dino_d2.measure.precision_parity import autocast_parity

__all__ = []

requires_onednn_bf16 = pytest.mark.skipif(
    not onednn_bfloat16_available(), reason="oneDNN has no bfloat16 matmul on this CPU"
)


class _Conversions(TorchDispatchMode):
    """Counts the dtype conversions (``aten::_to_copy`` between floating dtypes) of activations
    while ``active`` is set: conversions of the parameters' storages (``ignored``) do not count."""

    def __init__(self, ignored):
        super().__init__()
        self.active = False
        self.ignored = ignored
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (
            self.active
            and func is torch.ops.aten._to_copy.default
            and source.is_floating_point()
            and out.dtype != source.dtype
            and source.untyped_storage().data_ptr() not in self.ignored
        ):
            self.seen[(source.dtype, out.dtype, tuple(source.shape))] += 1
        return out


def _tiny_model(tiny_dino_config):
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config(decoder_layers=2).model).eval()
    perturb_frozen_batchnorm(model)
    generator = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(256, (3, 64, 96), generator=generator).float()}]
    return model, batch


@requires_onednn_bf16
def test_encoder_and_decoder_layers_convert_nothing_under_bf16(tiny_dino_config):
    model, batch = _tiny_model(tiny_dino_config)
    fast = optimized_copy(model)
    transformer = fast.transformer
    layers = [transformer.encoder.layers[0], transformer.decoder.layers[1]]
    # nn.MultiheadAttention's weights (the decoder's self-attention) are autocast's to convert.
    conversions = _Conversions({p.untyped_storage().data_ptr() for p in fast.parameters()})
    outputs = []

    def enter(module, args):
        conversions.active = True

    def leave(module, args, output):
        conversions.active = False
        outputs.append(output.dtype)

    for layer in layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fast(batch)  # weights cast and folded once
        outputs.clear()
        with conversions:
            fast(batch)
    assert outputs == [torch.bfloat16, torch.bfloat16]
    # The one conversion left in each layer: the attention weights, (N, Q, heads, levels,
    # points), into the deformable-attention kernel, which takes them in float32. Nothing is
    # converted back to bfloat16.
    assert sum(conversions.seen.values()) == len(layers), dict(conversions.seen)
    for source, target, shape in conversions.seen:
        assert (source, target) == (torch.bfloat16, torch.float32)
        assert shape[2:] == (4, transformer.num_levels, 4), shape


def test_inference_activations_only_at_inference_under_autocast():
    x, mask = torch.randn(2, 3), torch.ones(2, dtype=torch.bool)
    with torch.autocast("cpu", torch.bfloat16):
        with torch.no_grad():
            converted, untouched = inference_activations(x, mask)
        assert converted.dtype == torch.bfloat16 and untouched is mask
        # Training keeps autocast's float32 residual stream.
        assert inference_activations(x)[0] is x
    with torch.no_grad():
        assert inference_activations(x)[0] is x


def test_layer_norm_on_bfloat16_keeps_float32_statistics():
    torch.manual_seed(0)
    # A large mean: statistics summed in bfloat16 would lose the deviations entirely.
    x = (torch.randn(64, 256) * 3 + 200).bfloat16()
    weight, bias = torch.randn(256), torch.randn(256)
    expected = torch.nn.functional.layer_norm(x.float(), (256,), weight, bias)
    output = torch.nn.functional.layer_norm(x, (256,), weight, bias)
    assert output.dtype == torch.bfloat16
    # About the rounding of the output to bfloat16; statistics summed in bfloat16 miss by 0.4.
    torch.testing.assert_close(output.float(), expected, rtol=2**-7, atol=0.03)


@requires_onednn_bf16
def test_bf16_detections_pair_with_float32(tiny_dino_config):
    model, batch = _tiny_model(tiny_dino_config)
    comparison = autocast_parity(model, batch, torch.bfloat16)
    assert 0 < comparison.max_score_diff <= 0.05, comparison.summary()
