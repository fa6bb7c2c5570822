"""What :func:`dino_d2.export.export_onnx` does to make the exported graph cheap to run.

* batch norms after convolutions (Detectron2's ``FrozenBatchNorm2d``, a trainable
  ``BatchNorm2d`` in eval mode) are folded into the convolutions' weights: no
  ``BatchNormalization`` node is left, and the results are unchanged;
* the graph is optimized (constants folded, casts and reshapes removed): fewer nodes than the
  exporter's plain translation, with the same results;
* the decomposed deformable attention samples each level once and weighs all samples with one
  product and one sum;
* :func:`dino_d2.export.onnxruntime_session` computes on as many threads as torch.
"""

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from dino_d2.export import export_onnx, onnxruntime_session, run_onnxruntime
from dino_d2.layers import level_index_tensors, multi_scale_deformable_attn
from dino_d2.layers import ms_deform_attn as msda

__all__ = []

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

LEVELS = [(6, 5), (3, 3)]


def _random_statistics(norm: nn.Module, generator: torch.Generator) -> None:
    channels = norm.weight.shape[0]
    norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=generator))
    norm.running_mean.copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)


class _NormedConvs(nn.Module):
    """A convolution with a frozen batch norm, then one with a trainable batch norm, then ReLU."""

    def __init__(self):
        super().__init__()
        self.frozen = Conv2d(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8))
        self.trainable = Conv2d(8, 4, 3, stride=2, bias=False, norm=nn.BatchNorm2d(4))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for norm in (self.frozen.norm, self.trainable.norm):
                _random_statistics(norm, generator)

    def forward(self, image):
        return torch.relu(self.trainable(self.frozen(image)))


def _op_counts(proto):
    counts = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_batch_norms_are_folded_into_the_convolutions():
    model = _NormedConvs().eval()
    image = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    program = export_onnx(model, (image,))
    counts = _op_counts(program.model_proto)
    assert "BatchNormalization" not in counts, counts
    assert counts.get("Conv") == 2, counts
    (output,) = run_onnxruntime(program.model_proto, [image])
    with torch.no_grad():
        expected = model(image)
    error = np.abs(output - expected.numpy()).max()
    assert error <= 1e-5 * max(1.0, expected.abs().max().item()), error


class _Op(nn.Module):
    """The bare deformable-attention op on two fixed levels."""

    def forward(self, value, locations, weights):
        spatial_shapes, level_start_index = level_index_tensors(LEVELS, value.device)
        return multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights
        )


def _op_inputs(n, q, generator):
    return (
        torch.randn(n, sum(h * w for h, w in LEVELS), 2, 4, generator=generator),
        torch.rand(n, q, 2, len(LEVELS), 3, 2, generator=generator) * 1.4 - 0.2,
        torch.rand(n, q, 2, len(LEVELS), 3, generator=generator),
    )


def test_the_optimized_graph_has_fewer_nodes_and_the_same_results():
    generator = torch.Generator().manual_seed(2)
    args = _op_inputs(2, 7, generator)
    batch, queries = torch.export.Dim("batch", max=64), torch.export.Dim("queries", max=10000)
    shapes = ({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries})
    optimized = export_onnx(_Op().eval(), args, dynamic_shapes=shapes).model_proto
    with msda.msda_backend("grid_sample"):
        plain = torch.onnx.export(
            _Op().eval(), args, dynamo=True, dynamic_shapes=shapes, optimize=False, verbose=False
        ).model_proto
    optimized_counts, plain_counts = _op_counts(optimized), _op_counts(plain)
    assert sum(optimized_counts.values()) < sum(plain_counts.values())
    # One GridSample per level, and one product and one sum weigh every sample of every level.
    assert optimized_counts["GridSample"] == len(LEVELS)
    assert optimized_counts["ReduceSum"] == 1
    assert optimized_counts.get("Mul", 0) <= plain_counts.get("Mul", 0)
    value, locations, weights = _op_inputs(3, 40, generator)
    (fast,) = run_onnxruntime(optimized, [value, locations, weights])
    (slow,) = run_onnxruntime(plain, [value, locations, weights])
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)


def test_the_onnxruntime_session_computes_on_torch_s_threads():
    model = _NormedConvs().eval()
    program = export_onnx(model, (torch.randn(2, 3, 20, 28),))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        options = onnxruntime_session(program.model_proto).get_session_options()
    finally:
        torch.set_num_threads(previous)
    assert options.intra_op_num_threads == 1
    import onnxruntime

    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
