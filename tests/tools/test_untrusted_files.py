"""Every tool that reads a checkpoint, a config or an export's JSON refuses a file that would run
code, names the file and what it found, and runs nothing; --unsafe-load loads a trusted file.

The payloads (tests/conftest.py, ``write_payload``) would create a marker file if unpickled. The
training script runs as a user runs it, on the tiny digits set of test_lazyconfig_train_net.py;
the other tools are called through their ``main`` with a tiny saved config.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_lazyconfig_train_net import CONFIG, REPO, SCRIPT, TINY, data  # noqa: F401

from detectron2.config import LazyConfig, instantiate

from dino_d2.checkpoint import UntrustedFileError
from dino_d2.cli import benchmark, demo
from dino_d2.cli import export_model as export_cli
from dino_d2.engine.predictor import Predictor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_dino_config):
    """A tiny config saved as yaml, its model's weights and one image."""
    root = tmp_path_factory.mktemp("untrusted")
    cfg = tiny_dino_config()
    cfg.train.init_checkpoint = ""
    cfg.dataloader.test.num_workers = 0
    config = str(root / "tiny.yaml")
    LazyConfig.save(cfg, config)
    torch.manual_seed(0)
    weights = instantiate(cfg.model).state_dict()
    image = str(root / "image.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)).save(image)
    return {"root": root, "config": config, "cfg": cfg, "weights": weights, "image": image}


@pytest.fixture
def payload(tmp_path, write_payload):
    """``make(name, weights=None) -> (path, marker, global name)``."""

    def make(name, weights=None):
        path, marker = tmp_path / name, tmp_path / f"{name}.marker"
        return str(path), marker, write_payload(path, marker, weights)

    return make


def _assert_refused(message, path, global_name, marker):
    assert path in message and global_name in message, message[-3000:]
    assert "run code" in message and "--unsafe-load" in message, message[-3000:]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["payload.pth", "payload.pkl"])
def test_demo(tiny, payload, tmp_path, capsys, name):
    path, marker, global_name = payload(name)
    argv = ["--config-file", tiny["config"], "--input", tiny["image"], "--checkpoint", path]
    assert demo.main([*argv, "--output", str(tmp_path / "out")]) == 2
    _assert_refused(capsys.readouterr().err, path, global_name, marker)
    assert not (tmp_path / "out" / "detections.json").exists()


def test_predictor_and_its_opt_in(tiny, payload, caplog):
    path, marker, global_name = payload("payload.pth", tiny["weights"])
    with pytest.raises(UntrustedFileError) as error:
        Predictor(tiny["cfg"], checkpoint=path, device="cpu")
    _assert_refused(str(error.value), path, global_name, marker)
    predictor = Predictor(tiny["cfg"], checkpoint=path, device="cpu", unsafe_load=True)
    assert marker.exists()
    assert any(path in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(value, tiny["weights"][key]), key


def test_a_yaml_config_that_would_run_code(tiny, tmp_path, capsys):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    text = open(tiny["config"]).read()
    config.write_text(f"{text}hook: !!python/object/apply:builtins.open [{marker}, w]\n")
    argv = ["--config-file", str(config), "--input", tiny["image"], "--checkpoint", ""]
    assert demo.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "python/object/apply:builtins.open" in err, err
    assert not marker.exists()


def test_benchmark(tiny, payload, capsys):
    path, marker, global_name = payload("payload.pkl")
    argv = ["--config-file", tiny["config"], "--weights", path, "--num-iter", "1", "--warmup", "0"]
    argv += ["--height", "64", "--width", "96", "--no-limit", "--no-parity", "train.device=cpu"]
    assert benchmark.main(argv) == 2
    _assert_refused(capsys.readouterr().err, path, global_name, marker)


def test_exporter(tiny, payload, tmp_path, capsys):
    path, marker, global_name = payload("payload.pth")
    argv = ["--config-file", tiny["config"], "--output", str(tmp_path / "export")]
    assert export_cli.main([*argv, f"train.init_checkpoint={path}"]) == 2
    _assert_refused(capsys.readouterr().err, path, global_name, marker)
    assert not (tmp_path / "export" / "model.onnx").exists()


@pytest.mark.parametrize("name", ["payload.pth", "payload.pkl"])
def test_converter(payload, tmp_path, capsys, name, load_tool):
    path, marker, global_name = payload(name)
    output = str(tmp_path / "converted.pth")
    assert load_tool("convert_checkpoint").main(["--source", "idea", path, output]) == 1
    _assert_refused(capsys.readouterr().err, path, global_name, marker)
    assert not os.path.exists(output)


def test_verify_conversion_loader(payload, tmp_path, load_tool):
    """The tool's loading of --checkpoint (the authors' code is not needed to reach it)."""
    path, marker, global_name = payload("checkpoint0011_4scale.pth")
    tool = load_tool("verify_conversion")
    args = tool.parse_args(["--authors-repo", str(tmp_path), "--checkpoint", path])
    with pytest.raises(UntrustedFileError) as error:
        tool.prepare_authors(args, None, [], str(tmp_path))
    _assert_refused(str(error.value), path, global_name, marker)


def _train(tmp_path, output_dir, *args):
    """Runs the training script; returns (return code, console output)."""
    command = [sys.executable, SCRIPT, "--config-file", CONFIG, *args, *TINY]
    command += [f"train.output_dir={output_dir}", f"dataloader.evaluator.output_dir={output_dir}"]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    return result.returncode, result.stdout + result.stderr


def test_training_init_checkpoint(payload, data, tmp_path):  # noqa: F811 (data is a fixture)
    path, marker, global_name = payload("payload.pkl")
    code, output = _train(
        tmp_path, str(tmp_path / "out"), "--eval-only", f"train.init_checkpoint={path}", *data
    )
    assert code != 0
    _assert_refused(output, path, global_name, marker)


def test_resume_from_a_payload_checkpoint(payload, data, tmp_path):  # noqa: F811
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    path, marker, global_name = payload("model_final.pth")
    os.replace(path, output_dir / "model_final.pth")
    (output_dir / "last_checkpoint").write_text("model_final.pth")
    code, output = _train(tmp_path, str(output_dir), "--resume", "train.max_iter=2", *data)
    assert code != 0
    _assert_refused(output, str(output_dir / "model_final.pth"), global_name, marker)


def test_the_training_scripts_opt_in(payload, data, tmp_path):  # noqa: F811
    path, marker, _ = payload("payload.pth")
    code, output = _train(
        tmp_path,
        str(tmp_path / "out"),
        "--eval-only",
        "--unsafe-load",
        f"train.init_checkpoint={path}",
        *data,
    )
    assert code == 0, output[-3000:]
    assert marker.exists()
    assert any("WARNING" in line and path in line for line in output.splitlines()), output[-3000:]


def test_a_trained_checkpoint_resumes_without_the_opt_in(data, tmp_path):  # noqa: F811
    """Model, trainer (optimizer, scheduler) and EMA state, as the script saves them."""
    output_dir = str(tmp_path / "out")
    code, output = _train(tmp_path, output_dir, "train.max_iter=2", *data)
    assert code == 0, output[-3000:]
    code, output = _train(tmp_path, output_dir, "--resume", "train.max_iter=3", *data)
    assert code == 0, output[-3000:]
    assert "Starting training from iteration 2" in output
    assert "EMA restored from the checkpoint (2 updates)" in output
    assert "--unsafe-load" not in output


def _onnx_predict_run(tmp_path, info, capsys, load_tool):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: model.json is checked first")
    (tmp_path / "model.json").write_text(json.dumps(info))
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["--model", str(model), "--input", str(image), "--output", str(tmp_path / "out")]
    code = load_tool("deploy/onnx_predict").main(argv)
    return code, capsys.readouterr().err


GOOD_JSON = {
    "input_format": "RGB",
    "resize": {"type": "ResizeShortestEdge", "short_edge_length": 800, "max_size": 1333},
    "class_names": ["a", "b"],
}


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("input_format", "__import__('os').system('touch x')", "'RGB' or 'BGR'"),
        ("resize", "lambda: 0", "an object with short_edge_length and max_size"),
        ("resize.type", "eval", "'ResizeShortestEdge'"),
        ("resize.short_edge_length", "800", "an integer in 1..32768"),
        ("resize.max_size", 10**9, "an integer in 1..32768"),
        ("resize.max_size", True, "an integer in 1..32768"),
        ("class_names", [{"__class__": "os.system"}], "a list of strings"),
    ],
)
def test_onnx_predict_stops_at_a_hostile_model_json(
    tmp_path, capsys, key, value, expected, load_tool
):
    info = json.loads(json.dumps(GOOD_JSON))
    parent, _, name = key.rpartition(".")
    (info[parent] if parent else info)[name] = value
    code, err = _onnx_predict_run(tmp_path, info, capsys, load_tool)
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'model.json'}: {key} is {value!r}; expected {expected}" in err, err


def test_onnx_predict_stops_at_a_model_json_that_is_not_an_object(tmp_path, capsys, load_tool):
    code, err = _onnx_predict_run(tmp_path, ["input_format", "RGB"], capsys, load_tool)
    assert code == 2 and "holds a JSON list; expected an object" in err, err
