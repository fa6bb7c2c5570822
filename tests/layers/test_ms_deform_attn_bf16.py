"""The CPU kernel's bfloat16 path: bfloat16 values, float32 locations and weights, float32 sums.

Checked against the float64 reference run on the same (bfloat16-rounded) values: what is left is
the rounding of the output (and of grad_value) to bfloat16, not an error that grows with the
number of samples. The kernel works on any CPU (it converts bfloat16 in software), so these
tests do not need bfloat16 instructions.
"""

import pytest
import torch

from dino_d2.layers import multi_scale_deformable_attn, multi_scale_deformable_attn_pytorch
from dino_d2.layers import ms_deform_attn as msda

__all__ = []

# (N, Q, M, D, level shapes, P), the DINO-like heads of test_ms_deform_attn plus a case with
# more samples than pixels (the backward's head-major layout) and an odd head dim.
CASES = {
    "dino_heads": (2, 30, 8, 32, [(10, 13), (5, 7), (3, 3), (2, 1)], 4),
    "head_major_odd_dim": (1, 40, 2, 7, [(4, 5), (2, 3)], 3),
}
# bfloat16 keeps 8 significant bits: a rounding error of at most 2^-8 of the magnitude.
BF16_ROUNDING = 2.0**-8


def _inputs(n, q, m, d, level_shapes, p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s, num_levels = int(areas.sum()), len(level_shapes)
    value = torch.randn(n, s, m, d, generator=gen).bfloat16()
    locations = torch.rand(n, q, m, num_levels, p, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(n, q, m, num_levels, p, generator=gen)
    return value, spatial_shapes, level_start_index, locations, weights


def _bound(reference: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for a bfloat16 result: one rounding of the result plus float32 sums."""
    return BF16_ROUNDING * reference.abs() + 1e-5 * (1 + magnitude)


@pytest.fixture(name="cpu_kernel")
def cpu_kernel_fixture():
    if "compiled" not in msda.available_backends("cpu"):
        pytest.fail("dino_d2._C has no CPU kernel: build it (python setup.py build_ext --inplace)")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_forward_matches_float64_reference(cpu_kernel, case):
    value, shapes, starts, locations, weights = _inputs(*CASES[case])
    output = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    assert output.dtype == torch.bfloat16
    reference = multi_scale_deformable_attn_pytorch(
        value.double(), shapes, locations.double(), weights.double()
    )
    magnitude = multi_scale_deformable_attn_pytorch(
        value.double().abs(), shapes, locations.double(), weights.double()
    )
    error = (output.double() - reference).abs()
    assert (error <= _bound(reference, magnitude)).all(), f"max error {error.max().item():.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_backward_matches_float64_reference(cpu_kernel, case):
    value, shapes, starts, locations, weights = _inputs(*CASES[case])
    gen = torch.Generator().manual_seed(1)
    n, q, m, d = value.shape[0], locations.shape[1], value.shape[2], value.shape[3]
    grad_output = torch.randn(n, q, m * d, generator=gen).bfloat16()
    grads = torch.ops.dino_d2.ms_deform_attn_backward(
        value, shapes, starts, locations, weights, grad_output
    )
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    leaves = [t.double().requires_grad_() for t in (value, locations, weights)]
    reference_output = multi_scale_deformable_attn_pytorch(leaves[0], shapes, *leaves[1:])
    reference = torch.autograd.grad(reference_output, leaves, grad_output.double())
    for name, actual, expected in zip(("value", "locations", "weights"), grads, reference):
        error = (actual.double() - expected).abs()
        # grad_value is rounded to bfloat16 once; the float32 gradients only carry float32 sums.
        tol = BF16_ROUNDING if name == "value" else 1e-5
        bound = tol * expected.abs() + 1e-4 * (1 + expected.abs().max())
        assert (error <= bound).all(), f"grad {name}: max error {error.max().item():.3g}"


def test_bfloat16_values_keep_their_dtype_through_dispatch_and_autograd(cpu_kernel):
    """As under CPU autocast: bfloat16 values, float32 locations and softmaxed weights. The
    dispatch hands the values to the kernel as they are (no float32 copy) and autograd returns
    each gradient in its input's dtype."""
    value, shapes, starts, locations, weights = _inputs(*CASES["dino_heads"])
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attn(leaves[0], shapes, starts, *leaves[1:])
    assert output.dtype == torch.bfloat16
    expected = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    assert torch.equal(output, expected)
    output.float().square().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]


def test_bfloat16_values_with_float64_locations_are_promoted(cpu_kernel):
    """Only float32 or bfloat16 locations are narrowed to float32; float64 ones promote."""
    value, shapes, starts, locations, weights = _inputs(*CASES["dino_heads"])
    output = multi_scale_deformable_attn(value, shapes, starts, locations.double(), weights)
    assert output.dtype == torch.float64


def test_bfloat16_kernel_names_the_dtypes_it_expects(cpu_kernel):
    value, shapes, starts, locations, weights = _inputs(*CASES["dino_heads"])
    with pytest.raises(RuntimeError, match="must be Float with value of dtype BFloat16"):
        torch.ops.dino_d2.ms_deform_attn_forward(
            value, shapes, starts, locations.bfloat16(), weights
        )
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16 values"):
        torch.ops.dino_d2.ms_deform_attn_forward(
            value.half(), shapes, starts, locations.half(), weights.half()
        )
