"""Multiply-accumulate counts of a DINO's inference, with fvcore.

fvcore counts one fused multiply-add as one flop, i.e. it counts MACs, by tracing the model. The
deformable attention op, which fvcore does not know, is counted as 5 multiply-adds per sampled
point and channel (4 for the bilinear interpolation, 1 for the attention weight), and
``grid_sample`` (the op's PyTorch path) as 4 per output element.
"""

from collections import Counter
from typing import Dict, Tuple

from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

__all__ = ["count_macs"]

# The compiled deformable attention, as the JIT tracer records the custom op.
_MSDA_OP = "dino_d2::ms_deform_attn_forward"
_GRID_SAMPLE_OP = "aten::grid_sampler"


def _shape(value):
    return value.type().sizes()


def _msda_macs(inputs, outputs):
    """Inputs are (value, spatial_shapes, level_start_index, locations, weights)."""
    n, _, m, d = _shape(inputs[0])
    _, q, _, levels, points, _ = _shape(inputs[3])
    return Counter({"ms_deform_attn": 5 * n * q * m * levels * points * d})


def _grid_sample_macs(inputs, outputs):
    n, c, h, w = _shape(outputs[0])
    return Counter({"grid_sample": 4 * n * c * h * w})


class _TensorInterface(nn.Module):
    """Detectron2's list[dict] -> Instances contract as tensors in, tensors out, for tracing.

    (Detectron2 v0.6's TracingAdapter cannot be imported with current PyTorch: its package
    imports caffe2.)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        (output,) = self.model([{"image": image}])
        instances = output["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def count_macs(model: nn.Module, image: Tensor) -> Tuple[int, Dict[str, int]]:
    """MACs of one inference of a Detectron2-style ``model`` (eval mode) on ``image``.

    Args:
        model: takes ``[{"image": image}]`` and returns ``[{"instances": Instances}]``.
        image: (3, H, W) on the model's device.

    Returns:
        the total and the count of each operator.
    """
    analysis = FlopCountAnalysis(_TensorInterface(model), (image,))
    analysis.set_op_handle(**{_MSDA_OP: _msda_macs, _GRID_SAMPLE_OP: _grid_sample_macs})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total(), dict(analysis.by_operator())
