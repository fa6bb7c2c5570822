"""Tests of the deformable-attention backends and of the custom-op registration:
the gather backend against the grid_sample reference and the compiled kernel,
``msda_backend``, ``level_shapes`` / ``level_index_tensors``, and the fake kernels and
autograd formula of ``torch.ops.dino_d2.ms_deform_attn_*`` (``torch.library.opcheck``).

Helpers and cases come from test_ms_deform_attn.py (same folder).
"""

import pytest
import torch
from test_ms_deform_attn import CASES, KERNEL_NODE, TOLERANCE, _assert_close, _inputs, _shapes

from dino_d2.layers import MultiScaleDeformableAttention, MultiScaleLevels
from dino_d2.layers import ms_deform_attn as msda
from dino_d2.layers.ms_deform_attn import (
    msda_backend,
    msda_implementation,
    multi_scale_deformable_attn,
)
from dino_d2.layers.ms_deform_attn_reference import (
    multi_scale_deformable_attn_gather,
    multi_scale_deformable_attn_pytorch,
)
from dino_d2.layers.multi_scale_levels import level_index_tensors

__all__ = []


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernels():
    """The compiled extension is required here, as in test_ms_deform_attn.py."""
    assert msda.load_extension(), "dino_d2._C is not built"


def _grads(fn, value, locations, weights, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = fn(*leaves)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return output.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gather_matches_reference_and_kernel(case, dtype):
    value, shapes, starts, locations, weights = _inputs(*CASES[case], dtype=dtype)
    tol = TOLERANCE[dtype]
    n, q, m, d = value.shape[0], locations.shape[1], value.shape[2], value.shape[3]
    grad_output = torch.randn(n, q, m * d, generator=torch.Generator().manual_seed(1)).to(dtype)

    output, grads = _grads(
        lambda v, loc, w: multi_scale_deformable_attn_gather(v, shapes, starts, loc, w),
        value,
        locations,
        weights,
        grad_output,
    )
    expected, expected_grads = _grads(
        lambda v, loc, w: multi_scale_deformable_attn_pytorch(v, shapes, loc, w),
        value,
        locations,
        weights,
        grad_output,
    )
    kernel = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    assert output.shape == (n, q, m * d) and output.dtype == dtype
    _assert_close(output, expected, tol, "gather vs grid_sample")
    _assert_close(output, kernel, tol, "gather vs kernel")
    for name, grad, grad_ref in zip(("value", "locations", "weights"), grads, expected_grads):
        _assert_close(grad, grad_ref, tol, f"grad {name}")


def test_gather_matches_at_map_borders():
    """Pixel centres, map edges, the -1 pixel edge and far outside, in x and y."""
    value, shapes, starts, _, _ = _inputs(1, 1, 1, 4, [(3, 4)], 1, torch.float64)
    xs = torch.tensor(
        [-5.0, -0.125, -1 / 6, 0.0, 0.125, 0.5, 0.875, 1.0, 1.125, 7.0], dtype=torch.float64
    )
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 2)
    locations = grid.view(1, -1, 1, 1, 1, 2)
    weights = torch.ones(1, grid.shape[0], 1, 1, 1, dtype=torch.float64)
    output = multi_scale_deformable_attn_gather(value, shapes, starts, locations, weights)
    expected = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    kernel = torch.ops.dino_d2.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    _assert_close(output, expected, 1e-12, "gather vs grid_sample")
    _assert_close(output, kernel, 1e-12, "gather vs kernel")
    # Far outside the map reads exactly zero.
    far = (grid.abs() > 2).any(dim=-1)
    assert far.any() and output[0, far].abs().max() == 0


def test_gather_non_contiguous_value():
    value, shapes, starts, locations, weights = _inputs(
        2, 5, 3, 4, [(4, 3), (2, 2)], 2, torch.float64
    )
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not value_nc.is_contiguous()
    output = multi_scale_deformable_attn_gather(value_nc, shapes, starts, locations, weights)
    expected = multi_scale_deformable_attn_gather(value, shapes, starts, locations, weights)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_gather_gradcheck_float64():
    value, shapes, starts, locations, weights = _inputs(
        2, 3, 2, 3, [(3, 4), (2, 2)], 2, torch.float64
    )
    leaves = [t.requires_grad_() for t in (value, locations, weights)]

    def fn(value, locations, weights):
        return multi_scale_deformable_attn_gather(value, shapes, starts, locations, weights)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_level_shapes_replace_the_host_read_of_spatial_shapes():
    value, shapes, starts, locations, weights = _inputs(*CASES["five_levels"], torch.float64)
    pairs = [(int(h), int(w)) for h, w in shapes.tolist()]
    expected = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    output = multi_scale_deformable_attn_pytorch(
        value, shapes, locations, weights, level_shapes=pairs
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    with msda_backend("grid_sample"):
        dispatched = multi_scale_deformable_attn(
            value, shapes, starts, locations, weights, level_shapes=pairs
        )
    torch.testing.assert_close(dispatched, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="level_shapes must hold 5"):
        multi_scale_deformable_attn_pytorch(
            value, shapes, locations, weights, level_shapes=pairs[:4]
        )


def test_level_index_tensors():
    pairs = [(9, 11), (5, 6), (3, 3), (2, 1), (1, 1)]
    spatial_shapes, level_start_index = level_index_tensors(pairs)
    expected_shapes, expected_starts = _shapes(pairs)
    assert spatial_shapes.dtype == level_start_index.dtype == torch.int64
    torch.testing.assert_close(spatial_shapes, expected_shapes, rtol=0, atol=0)
    torch.testing.assert_close(level_start_index, expected_starts, rtol=0, atol=0)


@pytest.fixture(name="calls")
def calls_fixture(monkeypatch):
    """Records which pure-PyTorch backend the dispatcher calls (the kernel shows in grad_fn)."""
    calls = []
    for name in ("multi_scale_deformable_attn_gather", "multi_scale_deformable_attn_pytorch"):
        original = getattr(msda, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name.rsplit("_", 1)[-1])
            return _original(*args, **kwargs)

        monkeypatch.setattr(msda, name, spy)
    monkeypatch.delenv(msda.BACKEND_ENV_VAR, raising=False)
    return calls


def test_msda_backend_selects_nests_and_restores(calls, monkeypatch):
    value, shapes, starts, locations, weights = _inputs(1, 4, 2, 4, [(3, 4)], 2, torch.float64)
    value.requires_grad_()

    def run():
        return multi_scale_deformable_attn(value, shapes, starts, locations, weights)

    assert KERNEL_NODE in type(run().grad_fn).__name__ and calls == []
    with msda_backend("gather"):
        gather = run()
        with msda_backend("grid_sample"):
            grid_sample = run()
        again = run()
        # An explicit choice wins over the environment variable.
        monkeypatch.setenv(msda.BACKEND_ENV_VAR, "grid_sample")
        run()
        monkeypatch.delenv(msda.BACKEND_ENV_VAR)
    assert calls == ["gather", "pytorch", "gather", "gather"]
    assert KERNEL_NODE in type(run().grad_fn).__name__ and len(calls) == 4
    with msda_backend("auto"):
        assert KERNEL_NODE in type(run().grad_fn).__name__ and len(calls) == 4
    with msda_backend("compiled"):
        assert KERNEL_NODE in type(run().grad_fn).__name__ and len(calls) == 4
    monkeypatch.setenv(msda.BACKEND_ENV_VAR, "gather")
    run()
    assert calls[4:] == ["gather"]
    monkeypatch.delenv(msda.BACKEND_ENV_VAR)
    _assert_close(gather.detach(), grid_sample.detach(), 1e-12)
    torch.testing.assert_close(again, gather, rtol=0, atol=0)

    with pytest.raises(ValueError, match="msda_backend takes one of"):
        with msda_backend("kernel"):
            pass
    # A failure inside the block restores the previous setting too.
    with pytest.raises(RuntimeError, match="inside"):
        with msda_backend("gather"):
            raise RuntimeError("inside")
    assert msda._backend == "auto"


def test_compiled_backend_refuses_tensors_it_cannot_run():
    value, shapes, starts, locations, weights = _inputs(1, 4, 2, 4, [(3, 4)], 2, torch.float64)
    with msda_backend("compiled"), pytest.raises(RuntimeError, match="cannot run torch.int"):
        multi_scale_deformable_attn(value.int(), shapes, starts, locations.int(), weights.int())


def test_deprecated_names_warn_and_still_select(calls):
    value, shapes, starts, locations, weights = _inputs(1, 4, 2, 4, [(3, 4)], 2, torch.float64)
    with pytest.warns(DeprecationWarning, match="use msda_backend"):
        block = msda_implementation("gather")
    with block:
        multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    with pytest.warns(DeprecationWarning, match="'grid_sample'"), msda_backend("pytorch"):
        multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert calls == ["gather", "pytorch"]


def test_module_under_each_backend_matches_the_kernel():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(
        embed_dim=16, num_heads=2, num_levels=2, num_points=3
    ).double()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=2.0)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    value = torch.randn(2, 39, 16, generator=gen, dtype=torch.float64)
    refs = torch.rand(2, 7, 2, 4, generator=gen, dtype=torch.float64)
    masks = [torch.rand(2, h, w, generator=gen) > 0.7 for h, w in [(6, 5), (3, 3)]]
    levels = MultiScaleLevels.from_masks(masks)
    expected = module(query, refs, value, levels)
    for name in ("grid_sample", "gather"):
        with msda_backend(name):
            output = module(query, refs, value, levels)
        _assert_close(output, expected, 1e-12, name)


def _op_args(dtype=torch.float64, requires_grad=False):
    value, shapes, starts, locations, weights = _inputs(2, 5, 2, 3, [(3, 4), (2, 2)], 2, dtype)
    for t in (value, locations, weights):
        t.requires_grad_(requires_grad)
    return value, shapes, starts, locations, weights


def test_ops_pass_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch (dynamic shapes)."""
    forward = torch.ops.dino_d2.ms_deform_attn_forward.default
    backward = torch.ops.dino_d2.ms_deform_attn_backward.default
    results = torch.library.opcheck(forward, _op_args(requires_grad=True))
    assert set(results.values()) == {"SUCCESS"}, results
    grad_output = torch.randn(2, 5, 6, dtype=torch.float64)
    results = torch.library.opcheck(backward, (*_op_args(), grad_output))
    assert set(results.values()) == {"SUCCESS"}, results


def test_fake_kernels_give_the_output_shapes():
    args = _op_args(torch.float32)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        output = torch.ops.dino_d2.ms_deform_attn_forward(*fake)
        grads = torch.ops.dino_d2.ms_deform_attn_backward(*fake, output)
    assert output.shape == (2, 5, 6) and output.dtype == torch.float32
    for grad, like in zip(grads, (args[0], args[3], args[4])):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()
    meta = torch.ops.dino_d2.ms_deform_attn_forward(*[t.to("meta") for t in args])
    assert meta.shape == (2, 5, 6) and meta.device.type == "meta"


def test_kernel_gradients_are_first_order_only():
    value, shapes, starts, locations, weights = _op_args(requires_grad=True)
    output = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    (grad_locations,) = torch.autograd.grad(output.square().sum(), locations, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        grad_locations.sum().backward()
