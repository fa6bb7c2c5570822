"""Tests of multi-scale deformable attention: compiled kernels against the PyTorch reference,
gradients and the choice of backend (the module's tests are in test_deformable_attention.py).

The compiled extension is required (the project always builds it): the kernel tests fail, not
skip, without it. A CPU-only development build (``FORCE_CUDA=0 python setup.py build_ext
--inplace`` on a machine that has a matching CUDA toolkit) must be tested with ``FORCE_CUDA=0``
exported too, otherwise ``test_cuda_kernels_built_when_toolkit_present`` expects the CUDA kernels.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from dino_d2.layers import (
    available_backends,
    cuda_kernel_compiled,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
)
from dino_d2.layers import ms_deform_attn as msda

__all__ = []

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, Q, M, D, level shapes, P): single level, five levels, batch 3 and 65 (> 64), DINO-like
# heads, odd head dims, zero queries. Both layouts of the CPU backward pass are covered (Q * L * P
# below S for single_level_odd_dim and batch65_dim3, above it for the others).
CASES = {
    "single_level_odd_dim": (2, 7, 3, 5, [(6, 4)], 3),
    "five_levels": (1, 20, 2, 8, [(9, 11), (5, 6), (3, 3), (2, 1), (1, 1)], 2),
    "batch3_dim7": (3, 11, 4, 7, [(7, 5), (4, 3)], 4),
    "batch65_dim3": (65, 3, 2, 3, [(3, 5), (2, 2)], 2),
    "dino_heads": (2, 30, 8, 32, [(10, 13), (5, 7), (3, 3), (2, 1)], 4),
    "zero_queries": (2, 0, 2, 4, [(4, 4), (2, 2)], 2),
}
# Maximum error allowed, relative to max(1, largest magnitude of the reference).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _shapes(level_shapes):
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def _inputs(n, q, m, d, level_shapes, p, dtype, seed=0, device="cpu"):
    """Random inputs; sampling locations in [-0.2, 1.2] so that some fall outside the maps."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = _shapes(level_shapes)
    s, num_levels = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()), len(level_shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    locations = torch.rand(n, q, m, num_levels, p, 2, generator=gen, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(n, q, m, num_levels, p, generator=gen, dtype=torch.float64)
    return [
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (value, spatial_shapes, level_start_index, locations, weights)
    ]


def _assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol * scale, f"{what}: max abs error {error:.3g} > {tol:g} * {scale:.3g}"


def _reference_with_grads(value, spatial_shapes, locations, weights, grad_output):
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attn_pytorch(leaves[0], spatial_shapes, leaves[1], leaves[2])
    grads = torch.autograd.grad(output, leaves, grad_output, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return output.detach(), grads


def _grad_fn_name(output):
    return type(output.grad_fn).__name__ if output.grad_fn is not None else ""


# The compiled op's autograd node (registered with torch.library.register_autograd) is named
# after the op.
KERNEL_NODE = "ms_deform_attn_forward"


def test_cpu_kernel_is_built():
    assert "compiled" in available_backends("cpu"), "dino_d2._C with the CPU kernels is not built"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dino_d2::ms_deform_attn_backward", "CPU")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cpu_kernel_matches_reference(case, dtype):
    value, shapes, starts, locations, weights = _inputs(*CASES[case], dtype=dtype)
    tol = TOLERANCE[dtype]
    output = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, expected_grads = _reference_with_grads(value, shapes, locations, weights, grad_output)
    _assert_close(output, expected, tol, "output")

    grads = torch.ops.dino_d2.ms_deform_attn_backward(
        value, shapes, starts, locations, weights, grad_output
    )
    for name, grad, grad_ref in zip(("value", "locations", "weights"), grads, expected_grads):
        _assert_close(grad, grad_ref, tol, f"grad {name}")

    # The same through the dispatching autograd function.
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    assert KERNEL_NODE in _grad_fn_name(output)
    output.backward(grad_output)
    _assert_close(output.detach(), expected, tol, "dispatched output")
    for name, leaf, grad_ref in zip(("value", "locations", "weights"), leaves, expected_grads):
        _assert_close(leaf.grad, grad_ref, tol, f"dispatched grad {name}")


def test_cpu_kernel_non_contiguous_inputs():
    n, q, m, d, level_shapes, p = 3, 9, 4, 6, [(5, 7), (3, 2)], 3
    value, shapes, starts, locations, weights = _inputs(n, q, m, d, level_shapes, p, torch.float64)
    # Same values, other memory layouts.
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    locations_nc = torch.stack([locations[..., 0], locations[..., 1]], dim=0).movedim(0, -1)
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], dim=0).t()
    for t in (value_nc, locations_nc, weights_nc, shapes_nc):
        assert not t.is_contiguous()
    grad_output = torch.randn(n, m * d, q, dtype=torch.float64).transpose(1, 2)
    expected = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    expected_grads = torch.ops.dino_d2.ms_deform_attn_backward(
        value, shapes, starts, locations, weights, grad_output.contiguous()
    )
    output = torch.ops.dino_d2.ms_deform_attn_forward(
        value_nc, shapes_nc, starts, locations_nc, weights_nc
    )
    grads = torch.ops.dino_d2.ms_deform_attn_backward(
        value_nc, shapes_nc, starts, locations_nc, weights_nc, grad_output
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for grad, grad_ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_cpu_kernel_results_do_not_depend_on_threads():
    """Work is split without races or reordered sums: 1 and 2 threads agree bitwise."""
    value, shapes, starts, locations, weights = _inputs(*CASES["dino_heads"], torch.float32)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    results = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results[count] = [
                torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights),
                *torch.ops.dino_d2.ms_deform_attn_backward(
                    value, shapes, starts, locations, weights, grad_output
                ),
            ]
    finally:
        torch.set_num_threads(threads)
    for single, double in zip(results[1], results[2]):
        torch.testing.assert_close(double, single, rtol=0, atol=0)


def test_cpu_kernel_matches_reference_at_map_borders():
    """Locations exactly on pixel centres, edges and far outside the map."""
    value, shapes, starts, _, _ = _inputs(1, 1, 1, 4, [(3, 4)], 1, torch.float64)
    xs = torch.tensor([-5.0, -0.125, 0.0, 0.125, 0.5, 0.875, 1.0, 1.125, 7.0], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 2)
    locations = grid.view(1, -1, 1, 1, 1, 2)
    weights = torch.ones(1, grid.shape[0], 1, 1, 1, dtype=torch.float64)
    output = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    expected = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    _assert_close(output, expected, 1e-12, "output")


def test_gradcheck_float64():
    value, shapes, starts, locations, weights = _inputs(
        2, 3, 2, 3, [(3, 4), (2, 2)], 2, torch.float64
    )
    leaves = [t.requires_grad_() for t in (value, locations, weights)]

    def fn(value, locations, weights):
        return multi_scale_deformable_attn(value, shapes, starts, locations, weights)

    assert KERNEL_NODE in _grad_fn_name(fn(*leaves))
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_cpu_kernel_rejects_inconsistent_inputs():
    value, shapes, starts, locations, weights = _inputs(
        2, 3, 2, 4, [(3, 4), (2, 2)], 2, torch.float32
    )
    forward = torch.ops.dino_d2.ms_deform_attn_forward
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16 values"):
        forward(value.half(), shapes, starts, locations.half(), weights.half())
    with pytest.raises(RuntimeError, match="must be Float with value of dtype Float"):
        forward(value, shapes, starts, locations.double(), weights)
    with pytest.raises(RuntimeError, match="int64"):
        forward(value, shapes.int(), starts, locations, weights)
    with pytest.raises(RuntimeError, match="level_start_index"):
        forward(value, shapes, starts + 1, locations, weights)
    with pytest.raises(RuntimeError, match="spatial_shapes sums to"):
        forward(value[:, :-1], shapes, starts, locations, weights)
    with pytest.raises(RuntimeError, match="sampling_locations must have shape"):
        forward(value, shapes, starts, locations[..., :1], weights)
    with pytest.raises(RuntimeError, match="attention_weights must have shape"):
        forward(value, shapes, starts, locations, weights[:, :, :, :, :1])
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.dino_d2.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, torch.zeros(2, 3, 7)
        )


def test_unsupported_cpu_dtype_falls_back_to_reference():
    value, shapes, starts, locations, weights = _inputs(1, 5, 2, 4, [(3, 4)], 2, torch.float16)
    output = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    expected = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    assert output.dtype == torch.float16
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_mixed_dtypes_are_promoted():
    value, shapes, starts, locations, weights = _inputs(1, 5, 2, 4, [(3, 4)], 2, torch.float64)
    output = multi_scale_deformable_attn(value.float(), shapes, starts, locations, weights.float())
    assert output.dtype == torch.float64
    expected = multi_scale_deformable_attn_pytorch(
        value.float().double(), shapes, locations, weights.float().double()
    )
    _assert_close(output, expected, 1e-10)


def test_env_var_forces_reference(monkeypatch):
    value, shapes, starts, locations, weights = _inputs(1, 4, 2, 4, [(3, 4)], 2, torch.float64)
    value.requires_grad_()
    monkeypatch.setenv(msda.BACKEND_ENV_VAR, "grid_sample")
    output = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert KERNEL_NODE not in _grad_fn_name(output)
    # The old value "pytorch" still selects the reference, with a warning naming the new one.
    monkeypatch.setenv(msda.BACKEND_ENV_VAR, "pytorch")
    with pytest.warns(DeprecationWarning, match="'grid_sample'"):
        output = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert KERNEL_NODE not in _grad_fn_name(output)
    # Read on every call.
    monkeypatch.setenv(msda.BACKEND_ENV_VAR, "auto")
    output = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert KERNEL_NODE in _grad_fn_name(output)
    monkeypatch.setenv(msda.BACKEND_ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=msda.BACKEND_ENV_VAR):
        multi_scale_deformable_attn(value, shapes, starts, locations, weights)


def test_missing_extension_warns_once_and_uses_reference(monkeypatch):
    value, shapes, starts, locations, weights = _inputs(1, 4, 2, 4, [(3, 4)], 2, torch.float64)
    monkeypatch.setitem(sys.modules, "dino_d2._C", None)
    msda._extension_loaded.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = [
                multi_scale_deformable_attn(value, shapes, starts, locations, weights)
                for _ in range(3)
            ]
            assert available_backends() == ["grid_sample", "gather"]
            assert cuda_kernel_compiled() is False
        messages = [w for w in caught if "dino_d2._C" in str(w.message)]
        assert len(messages) == 1
        expected = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
        for output in outputs:
            torch.testing.assert_close(output, expected, rtol=0, atol=0)
    finally:
        monkeypatch.undo()
        msda._extension_loaded.cache_clear()
    assert available_backends() == ["compiled", "grid_sample", "gather"]


def _nvcc_release():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def test_cuda_kernels_built_when_toolkit_present():
    if cuda_kernel_compiled():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "dino_d2::ms_deform_attn_forward", "CUDA"
        )
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "dino_d2::ms_deform_attn_backward", "CUDA"
        )
    release = _nvcc_release()
    if (
        release is not None
        and release == torch.version.cuda
        and os.environ.get("FORCE_CUDA") != "0"
    ):
        assert cuda_kernel_compiled(), (
            f"nvcc {release} matches torch's CUDA but dino_d2._C has no CUDA kernels; rebuild, "
            "or export FORCE_CUDA=0 when testing a CPU-only build"
        )


@requires_cuda
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)],
    ids=["f64", "f32", "f16", "bf16"],
)
def test_cuda_kernel_matches_reference(dtype, tol):
    assert "compiled" in available_backends("cuda"), "dino_d2._C was built without the CUDA kernels"
    for case in ("five_levels", "batch65_dim3", "dino_heads", "zero_queries"):
        value, shapes, starts, locations, weights = _inputs(
            *CASES[case], dtype=dtype, device="cuda"
        )
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        output = multi_scale_deformable_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        assert KERNEL_NODE in _grad_fn_name(output)
        grad_output = torch.randn(output.shape, device="cuda").to(dtype)
        output.backward(grad_output)
        # Reference in float64 on the same (rounded) inputs.
        expected, expected_grads = _reference_with_grads(
            value.double(), shapes, locations.double(), weights.double(), grad_output.double()
        )
        _assert_close(output.detach(), expected, tol, f"{case} output")
        # Low-precision location gradients carry the rounding of x * W, hence the wider margin.
        grad_tols = (tol, tol if dtype in (torch.float64, torch.float32) else 4 * tol, tol)
        names = ("value", "locations", "weights")
        for name, leaf, grad_ref, grad_tol in zip(names, leaves, expected_grads, grad_tols):
            _assert_close(leaf.grad, grad_ref, grad_tol, f"{case} grad {name}")


@requires_cuda
def test_cuda_gradcheck_float64():
    value, shapes, starts, locations, weights = _inputs(
        2, 3, 2, 3, [(3, 4), (2, 2)], 2, torch.float64, device="cuda"
    )
    leaves = [t.requires_grad_() for t in (value, locations, weights)]

    def fn(value, locations, weights):
        return multi_scale_deformable_attn(value, shapes, starts, locations, weights)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_kernel_gradient_at_the_minus_one_pixel_edge_matches_grid_sample():
    """At exactly pixel -1 only the far corner is on the map: the location gradient is not 0."""
    spatial_shapes, level_start_index = _shapes([(3, 4)])
    value = torch.randn(
        1, 12, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    # x * W - 0.5 == -1 and y * H - 0.5 == -1, exactly representable.
    locations = torch.tensor([[-0.125, 0.5], [0.5, -1 / 6], [-0.125, -1 / 6]], dtype=torch.float64)
    locations = locations.view(1, 3, 1, 1, 1, 2)
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    grads = []
    for kernel in (True, False):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        if kernel:
            out = torch.ops.dino_d2.ms_deform_attn_forward(
                inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2]
            )
            grad = torch.ops.dino_d2.ms_deform_attn_backward(
                inputs[0],
                spatial_shapes,
                level_start_index,
                inputs[1],
                inputs[2],
                torch.ones_like(out),
            )
        else:
            out = multi_scale_deformable_attn_pytorch(
                inputs[0], spatial_shapes, inputs[1], inputs[2]
            )
            grad = torch.autograd.grad(out.sum(), inputs)
        grads.append(grad)
    for kernel_grad, reference_grad in zip(*grads):
        torch.testing.assert_close(kernel_grad, reference_grad, atol=1e-12, rtol=1e-10)
    assert grads[1][1].abs().sum() > 0
