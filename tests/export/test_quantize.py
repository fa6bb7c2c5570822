"""An ONNX export run in OpenVINO (float32 and bfloat16) and quantized to int8 by NNCF: the
OpenVINO runs agree with onnxruntime, the float parts stay free of quantizers, and the tool
writes the int8 model only when its AP holds."""

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch

from detectron2.config import instantiate

from dino_d2.cli import quantize as quantize_cli
from dino_d2.export.exporter import export_model, load_exported, load_openvino
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.quantize import (
    FLOAT_PARTS,
    accept_int8,
    float_node_names,
    module_scope,
    openvino_bf16_supported,
    quantize_int8,
)

openvino = pytest.importorskip("openvino", reason="the openvino extra is part of make test")
nncf = pytest.importorskip("nncf", reason="the openvino extra is part of make test")

SIZES = [(96, 128), (80, 100)]
NUM_SELECT = 10


def _images(sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (h, w) in enumerate(sizes):
        batch[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=generator)
    return batch.to(torch.uint8), torch.tensor(sizes)


def _feeds(count, seed=0):
    feeds = []
    for i in range(count):
        images, sizes = _images([SIZES[i % 2]], seed + i)
        feeds.append({"images": images.numpy(), "image_sizes": sizes.numpy()})
    return feeds


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dino_config):
    """The tiny DINO (two decoder layers, perturbed weights) exported to ONNX."""
    cfg = tiny_dino_config(decoder_layers=2, num_select=NUM_SELECT)
    model = instantiate(cfg.model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    graph = InferenceGraph(model)
    root = tmp_path_factory.mktemp("quantize")
    preprocessing = {
        "input_dtype": "uint8",
        "min_input_size": 65,
        "outputs": {"boxes": "", "scores": "", "classes": ""},
    }
    result = export_model(
        graph, _images(SIZES, 0), "onnx", str(root), preprocessing=preprocessing, verification=[]
    )
    return {"cfg": cfg, "model": model, "path": result.path, "root": root}


def _check_outputs(outputs, batch):
    boxes, scores, classes = (np.asarray(o) for o in outputs)
    assert boxes.shape == (batch, NUM_SELECT, 4) and boxes.dtype == np.float32
    assert scores.shape == (batch, NUM_SELECT) and classes.shape == (batch, NUM_SELECT)
    assert np.isfinite(boxes).all() and np.isfinite(scores).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    return boxes, scores, classes


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_openvino_runs_the_export_as_onnxruntime_does(exported, precision):
    if precision == "bf16" and not openvino_bf16_supported():
        pytest.skip("this CPU has no bfloat16 instructions (OpenVINO's OPTIMIZATION_CAPABILITIES)")
    images, sizes = _images([(96, 128), (70, 90), (65, 65)], seed=5)
    reference = _check_outputs(load_exported(exported["path"], "onnx")(images, sizes), 3)
    boxes, scores, classes = _check_outputs(
        load_openvino(exported["path"], precision)(images, sizes), 3
    )
    # bfloat16 keeps 8 bits of mantissa: scores differ by about 1e-2, and near-ties may swap.
    tolerance = 1e-4 if precision == "f32" else 5e-2
    np.testing.assert_allclose(scores, reference[1], atol=tolerance)
    if precision == "f32":
        np.testing.assert_allclose(boxes, reference[0], atol=1e-2)
        np.testing.assert_array_equal(classes, reference[2])


def test_float_parts_are_found_by_module_path(exported):
    model = onnx.load(exported["path"], load_external_data=False)
    scopes = {node.name: module_scope(node) for node in model.graph.node}
    decoder = float_node_names(model, ["decoder"])
    assert decoder and all(".decoder" in scopes[name] for name in decoder)
    assert any(scopes[name].endswith("decoder.class_embed.1") for name in decoder)
    sampling = float_node_names(model, ["sampling"])
    assert {scopes[name].rsplit(".", 1)[1] for name in sampling} == {
        "sampling_offsets",
        "attention_weights",
    }
    assert all(".encoder." in scopes[name] for name in sampling)
    backbone = [name for name, scope in scopes.items() if ".backbone." in scope]
    assert backbone and not set(backbone) & set(float_node_names(model, FLOAT_PARTS))
    with pytest.raises(ValueError, match="unknown float part.*'heads'"):
        float_node_names(model, ["heads"])
    for node in model.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ValueError, match="'decoder' matches no node.*name_scopes"):
        float_node_names(model, ["decoder"])


def _quantized_inputs(ov_model):
    """Friendly names of the operations that read a FakeQuantize output."""
    names = set()
    for op in ov_model.get_ops():
        for value in op.inputs():
            if value.get_source_output().get_node().get_type_name() == "FakeQuantize":
                names.add(op.get_friendly_name())
    return names


def test_int8_model_runs_and_keeps_the_float_parts_in_float(exported, tmp_path):
    calibration = _feeds(4)
    onnx_model = onnx.load(exported["path"], load_external_data=False)
    images, sizes = _images([(96, 128), (70, 90)], seed=9)
    quantized = {}
    for name, parts in (("whole", ()), ("float_parts", list(FLOAT_PARTS))):
        model = quantize_int8(exported["path"], calibration, parts)
        path = str(tmp_path / name / "model_int8.xml")
        openvino.save_model(model, path)
        _check_outputs(load_openvino(path, "f32")(images, sizes), 2)
        quantized[name] = _quantized_inputs(model)
    kept = set(float_node_names(onnx_model, FLOAT_PARTS))
    # The whole model quantizes the decoder's matrix products too; the ignored scope none.
    assert quantized["whole"] & kept
    assert quantized["float_parts"] and not quantized["float_parts"] & kept
    assert quantized["float_parts"] < quantized["whole"]


def test_the_ap_rule():
    assert accept_int8(60.3, 59.4).accepted
    refused = accept_int8(60.3, 59.2)
    assert not refused.accepted and "drop 1.10, more than 1.00" in refused.message
    assert not accept_int8(60.3, math.nan).accepted
    assert accept_int8(60.3, 58.0, max_drop=3.0).accepted


@pytest.mark.parametrize(
    "int8_ap, force, code", [(49.5, False, 0), (47.0, False, 1), (47.0, True, 0)]
)
def test_the_tool_writes_int8_only_when_the_ap_holds(
    exported, tmp_path, monkeypatch, capsys, int8_ap, force, code
):
    # The APs are stubbed (the tiny model detects nothing); quantization and saving are real.
    aps = iter([{"bbox": 50.0}, {"bbox": int8_ap}])
    cfg = copy.deepcopy(exported["cfg"])
    cfg.train.init_checkpoint = ""
    monkeypatch.setattr(quantize_cli, "load_config_file", lambda path: cfg)
    monkeypatch.setattr(quantize_cli, "calibration_inputs", lambda cfg, n, *a, **k: _feeds(n))
    monkeypatch.setattr(quantize_cli, "coco_ap", lambda cfg, detector: next(aps))
    out = tmp_path / "int8"
    argv = ["--config-file", "tiny.py", "--model", exported["path"], "--output", str(out)]
    result = quantize_cli.main(
        argv + ["--calibration-images", "3"] + (["--force"] if force else [])
    )
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert f"box AP float32 50.00, int8 {int8_ap:.2f}" in captured.out
    if code == 1:
        assert "refused" in captured.err and not out.exists()
        return
    info = json.loads((out / "model_int8.json").read_text())
    assert info["format"] == "openvino-int8" and info["quantization"]["forced"] is force
    assert info["quantization"]["calibration_images"] == 3
    assert set(info["quantization"]["float_parts"]) == set(FLOAT_PARTS)
    assert (out / "model_int8.bin").is_file()
    # An existing output is not replaced without --overwrite.
    assert quantize_cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_tool_names_a_missing_export(tmp_path, capsys):
    argv = ["--config-file", "c.py", "--model", str(tmp_path / "m.onnx"), "--output", "o"]
    assert quantize_cli.main(argv) == 2
    assert "m.onnx: no such file" in capsys.readouterr().err


def test_export_eval_runs_openvino_only_for_onnx(exported):
    from dino_d2.cli import export_model as export_cli
    from dino_d2.export.exporter import ExportError

    base = ["--config-file", "c.py", "--output", "o", "--eval"]
    args = export_cli.parse_args(base + ["--runtime", "openvino", "--precision", "f32"])
    images, sizes = _images([(70, 90)], seed=3)
    reference = load_exported(exported["path"], "onnx")(images, sizes)
    np.testing.assert_allclose(
        export_cli._runner(args, exported["path"])(images, sizes)[1], reference[1], atol=1e-4
    )
    with pytest.raises(ExportError, match="--runtime openvino runs ONNX exports, not --format pt2"):
        export_cli._runner(
            export_cli.parse_args(base + ["--format", "pt2", "--runtime", "openvino"]), "m"
        )
    with pytest.raises(ExportError, match="--precision bf16 needs --runtime openvino"):
        export_cli._runner(export_cli.parse_args(base + ["--precision", "bf16"]), "m")
