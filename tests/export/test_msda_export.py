"""Deformable attention in exported graphs, at module level, with dynamic batch, height and width.

A small module (conv feature maps of an image -> flattened levels -> MultiScaleDeformableAttention)
is exported once at one size and run at three others (not multiples of 32, extreme aspect ratios)
at batch 1 and 3, against eager PyTorch (which uses the compiled CPU kernel):

* ``torch.export``: the compiled op stays one node and the ExportedProgram runs the kernel;
* ONNX through onnxruntime, with the op decomposed into GridSample (the default) or into gathers;
* an AOTInductor package (compiled with gcc; the slowest test here, about 15-60 s).
"""

import time

import numpy as np
import pytest
import torch
from torch import nn

from dino_d2.export import check_onnx_graph, export_onnx, run_onnxruntime
from dino_d2.layers import (
    MultiScaleDeformableAttention,
    MultiScaleLevels,
    level_index_tensors,
    multi_scale_deformable_attn,
)
from dino_d2.layers import ms_deform_attn as msda

__all__ = []

EXPORT_SIZE = (2, 3, 64, 96)
# (height, width): not multiples of 32, one very wide, one very tall.
OTHER_SIZES = [(50, 70), (33, 301), (97, 17)]
BATCHES = [1, 3]
OP = torch.ops.dino_d2.ms_deform_attn_forward.default if msda.load_extension() else None


class LevelsToAttention(nn.Module):
    """Three conv levels (strides 2, 4, 8) of an image, attended by every token.

    Input: (N, 3, H, W) image. Output: (N, S, C), S = sum of the levels' H_l * W_l. The level
    sizes flow from the feature maps' shapes (SymInts under export) into the levels' ``shapes``.
    """

    def __init__(self, channels=16, num_heads=2, num_levels=3, num_points=2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.downs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_levels - 1)
        )
        self.query = nn.Linear(channels, channels)
        self.attn = MultiScaleDeformableAttention(
            embed_dim=channels, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        # Offsets of several pixels, some out of the maps, and uneven attention weights.
        nn.init.normal_(self.attn.sampling_offsets.weight, std=1.0)
        nn.init.normal_(self.attn.attention_weights.weight, std=1.0)

    def forward(self, image):
        x = self.stem(image)
        features = [x]
        for down in self.downs:
            x = down(x)
            features.append(x)
        levels = MultiScaleLevels.from_masks(
            [f.new_zeros((f.shape[0], f.shape[2], f.shape[3]), dtype=torch.bool) for f in features]
        )
        level_shapes = levels.shapes
        value = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        n, s, _ = value.shape
        centres = []
        for h, w in level_shapes:
            ys = (torch.arange(h, device=image.device, dtype=value.dtype) + 0.5) / h
            xs = (torch.arange(w, device=image.device, dtype=value.dtype) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            centres.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
        reference_points = torch.cat(centres)[None, :, None].expand(n, s, len(features), 2)
        return self.attn(self.query(value), reference_points, value, levels)


def _dynamic_shapes():
    # Every level must keep at least 2 pixels (export specializes sizes 0 and 1): H, W >= 16.
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=16, max=4096)
    width = torch.export.Dim("width", min=16, max=4096)
    return {"image": {0: batch, 2: height, 3: width}}


def _images():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, h, w, generator=gen) for h, w in OTHER_SIZES for n in BATCHES]


def _assert_close(actual, expected, rel_tol, what):
    actual = torch.as_tensor(np.asarray(actual))
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {expected.shape}"
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rel_tol * scale, f"{what}: max abs diff {error:.3g} > {rel_tol} * {scale:.3g}"


def _ran_kernel(fn):
    """Runs fn() under the profiler; returns whether dino_d2's compiled op was dispatched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "dino_d2::ms_deform_attn_forward" for e in prof.events())


@pytest.fixture(name="model", scope="module")
def model_fixture():
    assert OP is not None, "dino_d2._C is not built"
    torch.manual_seed(0)
    return LevelsToAttention().eval()


@pytest.fixture(name="eager", scope="module")
def eager_fixture(model):
    """Eager outputs (compiled CPU kernel) on every test image."""
    images = _images()
    with torch.no_grad():
        outputs = [model(image) for image in images]
    return list(zip(images, outputs))


@pytest.fixture(name="exported", scope="module")
def exported_fixture(model):
    example = torch.randn(*EXPORT_SIZE, generator=torch.Generator().manual_seed(0))
    return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())


def test_export_keeps_the_op_as_one_node(exported):
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1, [str(t) for t in targets]
    assert not [t for t in targets if "grid_sampler" in str(t) or "index_select" in str(t)]
    # The same after decomposition to the core ATen set (what AOTInductor lowers).
    decomposed = exported.run_decompositions()
    targets = [n.target for n in decomposed.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1


def test_exported_program_runs_the_kernel_at_other_sizes(exported, eager):
    module = exported.module()
    for image, expected in eager:
        with torch.no_grad():
            assert _ran_kernel(lambda: module(image))
            output = module(image)
        # The same kernel on the same inputs: equal up to the convolutions' reordering.
        _assert_close(output, expected, 1e-6, f"ExportedProgram at {tuple(image.shape)}")


def test_exported_program_round_trips_through_a_file(exported, eager, tmp_path):
    path = tmp_path / "levels.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path).module()
    image, expected = eager[-1]
    with torch.no_grad():
        _assert_close(loaded(image), expected, 1e-6, "loaded ExportedProgram")


@pytest.fixture(name="onnx_programs", scope="module")
def onnx_programs_fixture(model, tmp_path_factory):
    """The default export (plain torch.onnx.export, opset 17) and the gather one (a file)."""
    example = torch.randn(*EXPORT_SIZE, generator=torch.Generator().manual_seed(0))
    # No msda_backend block: the op picks grid_sample by itself during the ONNX export.
    default = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=17,
        dynamic_shapes=_dynamic_shapes(),
        verbose=False,
    )
    path = str(tmp_path_factory.mktemp("onnx") / "levels_gather.onnx")
    export_onnx(model, (example,), path, msda_backend="gather", dynamic_shapes=_dynamic_shapes())
    return {"grid_sample": default.model_proto, "gather": path}


def _op_types(model):
    import onnx

    if isinstance(model, str):
        model = onnx.load(model)
    return {node.op_type for node in model.graph.node}, model


def test_onnx_graphs_hold_the_chosen_decomposition(onnx_programs):
    types, proto = _op_types(onnx_programs["grid_sample"])
    assert "GridSample" in types
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    check_onnx_graph(proto, "grid_sample")
    with pytest.raises(ValueError, match="GridSample nodes"):
        check_onnx_graph(proto, "gather")

    types, proto = _op_types(onnx_programs["gather"])
    assert "GridSample" not in types and "Gather" in types
    check_onnx_graph(proto, "gather")


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_onnxruntime_matches_eager_at_other_sizes(onnx_programs, eager, impl):
    # onnxruntime's float32 convolutions and matmuls round differently from PyTorch's (~1e-6
    # relative), and the offsets (std-1 weights) move sampling locations by that times a few
    # pixels: about 1e-5 relative here. A wrong sampling convention would be off by 1e-1.
    for image, expected in eager:
        (output,) = run_onnxruntime(onnx_programs[impl], [image])
        print(
            f"{impl} {tuple(image.shape)}: max abs diff {np.abs(output - expected.numpy()).max():.2e}"
        )
        _assert_close(output, expected, 1e-4, f"onnxruntime ({impl}) at {tuple(image.shape)}")


def test_onnx_decompositions_agree(onnx_programs, eager):
    image = eager[3][0]
    (grid_sample,) = run_onnxruntime(onnx_programs["grid_sample"], [image])
    (gather,) = run_onnxruntime(onnx_programs["gather"], [image])
    _assert_close(gather, torch.from_numpy(grid_sample), 1e-4, "gather vs grid_sample")


def test_export_onnx_rejects_bad_arguments(model):
    example = torch.randn(*EXPORT_SIZE)
    with pytest.raises(ValueError, match="msda_backend must be one of"):
        export_onnx(model, (example,), msda_backend="kernel")
    with pytest.raises(ValueError, match="opset_version must be at least 17"):
        export_onnx(model, (example,), opset_version=16)


class _Op(nn.Module):
    """The bare op on two fixed levels, with dynamic batch and query count."""

    def forward(self, value, locations, weights):
        spatial_shapes, level_start_index = level_index_tensors([(6, 5), (3, 3)], value.device)
        return multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights
        )


def _op_inputs(gen, n, q):
    """Inputs of :class:`_Op`: n images, q queries, locations up to 0.2 off the maps."""
    return (
        torch.randn(n, 39, 2, 4, generator=gen),
        torch.rand(n, q, 2, 2, 3, 2, generator=gen) * 1.4 - 0.2,
        torch.rand(n, q, 2, 2, 3, generator=gen),
    )


def _op_dynamic_shapes():
    batch, queries = torch.export.Dim("batch", max=64), torch.export.Dim("queries", max=10000)
    return ({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries})


def test_aoti_package_runs_the_kernel(tmp_path):
    gen = torch.Generator().manual_seed(0)
    exported = torch.export.export(
        _Op().eval(), _op_inputs(gen, 2, 7), dynamic_shapes=_op_dynamic_shapes()
    )
    start = time.perf_counter()
    # -O0 for the host-side wrapper only (the generated kernels keep their optimization): the
    # compile dominates this test.
    path = torch._inductor.aoti_compile_and_package(
        exported,
        package_path=str(tmp_path / "op.pt2"),
        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"},
    )
    print(f"AOTInductor compile: {time.perf_counter() - start:.1f} s")
    runner = torch._inductor.aoti_load_package(path)
    for n, q in ((1, 3), (3, 11)):
        args = _op_inputs(gen, n, q)
        assert _ran_kernel(lambda: runner(*args))
        _assert_close(runner(*args), _Op()(*args), 1e-6, f"AOTInductor at batch {n}, {q} queries")


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_onnx_op_alone_matches_the_kernel(impl):
    """Without convolutions around it, onnxruntime's result is the kernel's to float rounding."""
    gen = torch.Generator().manual_seed(2)
    program = export_onnx(
        _Op().eval(),
        _op_inputs(gen, 2, 7),
        msda_backend=impl,
        dynamic_shapes=_op_dynamic_shapes(),
    )
    for n, q in ((1, 5), (3, 40)):
        args = _op_inputs(gen, n, q)
        (output,) = run_onnxruntime(program.model_proto, list(args))
        expected = _Op()(*args)
        _assert_close(output, expected, 1e-6, f"onnxruntime ({impl}) op at batch {n}, {q} queries")


def _run_node(runtime, model, inputs, tmp_path):
    """Runs an ONNX ModelProto holding dino_d2's node in onnxruntime or OpenVINO (float32), with
    dino_d2's library for that runtime."""
    from dino_d2.export import msda_node

    if runtime == "onnxruntime":
        assert msda_node.onnxruntime_library() is not None, "make fetches onnxruntime's headers"
        return run_onnxruntime(model, list(inputs))
    openvino = pytest.importorskip("openvino", reason="the openvino extra is part of make test")
    import onnx

    path = str(tmp_path / "model.onnx")
    onnx.save(model, path)
    core = openvino.Core()
    msda_node.add_to_openvino(core)
    compiled = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = compiled([x.numpy() for x in inputs])
    return [np.asarray(outputs[o]) for o in compiled.outputs]


RUNTIMES = ["onnxruntime", "openvino"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_node_runs_the_kernel_at_other_sizes(model, eager, tmp_path, runtime):
    example = torch.randn(*EXPORT_SIZE, generator=torch.Generator().manual_seed(0))
    program = export_onnx(model, (example,), msda_backend="node", dynamic_shapes=_dynamic_shapes())
    ops = [f"{n.domain}::{n.op_type}" for n in program.model_proto.graph.node]
    assert ops.count("dino_d2::MultiScaleDeformableAttention") == 1
    assert "::GridSample" not in ops
    check_onnx_graph(program.model_proto, "node")
    with pytest.raises(ValueError, match="non-standard operators.*MultiScaleDeformableAttention"):
        check_onnx_graph(program.model_proto, "grid_sample")
    for image, expected in eager:
        # The runtimes' convolutions round differently from PyTorch's.
        (output,) = _run_node(runtime, program.model_proto, [image], tmp_path)
        _assert_close(output, expected, 1e-4, f"{runtime} node at {tuple(image.shape)}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_node_alone_equals_the_kernel(tmp_path, runtime):
    """The same kernel on the same inputs, locations off the maps included: equal outputs (also
    with more blocks than one task of onnxruntime's thread pool takes)."""
    gen = torch.Generator().manual_seed(3)
    program = export_onnx(
        _Op().eval(),
        _op_inputs(gen, 2, 7),
        msda_backend="openvino",  # the node's former name
        dynamic_shapes=_op_dynamic_shapes(),
    )
    for n, q in ((1, 5), (3, 40), (2, 700)):
        args = _op_inputs(gen, n, q)
        (output,) = _run_node(runtime, program.model_proto, args, tmp_path)
        _assert_close(output, _Op()(*args), 1e-7, f"{runtime} node at batch {n}, {q} queries")


def _node_graph():
    """A graph of dino_d2's node alone, two levels of sizes given as inputs."""
    from onnx import TensorProto, helper

    node = helper.make_node(
        "MultiScaleDeformableAttention",
        ["value", "spatial_shapes", "level_start_index", "locations", "weights"],
        ["output"],
        domain="dino_d2",
    )
    shapes = {
        "value": [1, 39, 2, 4],
        "spatial_shapes": [2, 2],
        "level_start_index": [2],
        "locations": [1, 5, 2, 2, 3, 2],
        "weights": [1, 5, 2, 2, 3],
    }
    integers = ("spatial_shapes", "level_start_index")
    graph = helper.make_graph(
        [node],
        "op",
        [
            helper.make_tensor_value_info(
                name, TensorProto.INT64 if name in integers else TensorProto.FLOAT, dims
            )
            for name, dims in shapes.items()
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5, 8])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("dino_d2", 1)]
    )


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_node_names_inconsistent_levels(tmp_path, runtime):
    model = _node_graph()
    value = torch.randn(1, 39, 2, 4)
    locations, weights = torch.rand(1, 5, 2, 2, 3, 2), torch.rand(1, 5, 2, 2, 3)
    good = [value, torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30]), locations, weights]
    (output,) = _run_node(runtime, model, good, tmp_path)
    spatial_shapes, level_start_index = level_index_tensors([(6, 5), (3, 3)], "cpu")
    expected = multi_scale_deformable_attn(
        value, spatial_shapes, level_start_index, locations, weights
    )
    _assert_close(output, expected, 1e-7, f"{runtime} node with the level sizes as inputs")
    errors = RuntimeError if runtime == "openvino" else Exception  # onnxruntime's own types
    bad = good[:2] + [torch.tensor([0, 29])] + good[3:]
    with pytest.raises(errors, match=r"level_start_index\[1\] must be 30, got 29"):
        _run_node(runtime, model, bad, tmp_path)
    bad = good[:1] + [torch.tensor([[6, 5], [3, 2]])] + good[2:]
    with pytest.raises(errors, match="value has S = 39 pixels but spatial_shapes sums to 36"):
        _run_node(runtime, model, bad, tmp_path)


def test_a_node_graph_without_the_library_names_what_to_do(tmp_path, monkeypatch):
    from dino_d2.export import msda_node
    from dino_d2.export.onnx import onnxruntime_session

    monkeypatch.setattr(msda_node, "onnxruntime_library", lambda: None)
    with pytest.raises(ImportError, match="_onnxruntime_msda.*headers were not found"):
        onnxruntime_session(_node_graph())
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a library")
    monkeypatch.setattr(msda_node, "onnxruntime_library", lambda: str(broken))
    with pytest.raises(ImportError, match="onnxruntime cannot load dino_d2's library.*broken.so"):
        onnxruntime_session(_node_graph())
