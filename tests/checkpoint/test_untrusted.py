"""Checkpoint and config files from others: loading them never runs code they carry, unless the
user opts in with --unsafe-load (unsafe=True), and the formats dino_d2 reads still load.

Each payload file would create a marker file if it were unpickled (tests/conftest.py,
``write_payload``); the marker appearing under the opt-in shows the payload is live."""

import argparse
import logging
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detectron2.config import LazyConfig

from dino_d2.checkpoint import AtomicCheckpointer, UntrustedFileError, load_checkpoint_file
from dino_d2.engine.output_dir import _complete_pickle
from dino_d2.model_zoo import UnsafeConfigError, get_config, list_configs, load_config_file


class _Net(nn.Module):
    """Two layers whose names Detectron2's matching heuristics map one to one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)


def _random_weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in _Net().state_dict().items()}


def _assert_refused(error, path, global_name):
    message = str(error.value)
    assert str(path) in message and global_name in message, message
    assert "run code" in message and "--unsafe-load" in message and "torch.save" in message
    assert global_name in error.value.found


@pytest.mark.parametrize("name", ["payload.pth", "payload_legacy.pt", "payload.pkl"])
def test_a_payload_is_refused_without_running(tmp_path, write_payload, name):
    path, marker = tmp_path / name, tmp_path / "marker"
    # .pt: torch's pre-1.6 (non-zip) format.
    global_name = write_payload(
        path, marker, _random_weights(), zip_format=name != "payload_legacy.pt"
    )
    with pytest.raises(UntrustedFileError) as error:
        load_checkpoint_file(str(path))
    _assert_refused(error, path, global_name)
    assert not marker.exists()
    # Detectron2's checkpointer, as every tool uses it, reads through the same function.
    with pytest.raises(UntrustedFileError) as error:
        AtomicCheckpointer(_Net()).load(str(path))
    _assert_refused(error, path, global_name)
    assert not marker.exists()


def test_the_refusal_crosses_process_boundaries(tmp_path, write_payload):
    """A worker's error is pickled to the launching process: it keeps its message."""
    path = tmp_path / "payload.pth"
    write_payload(path, tmp_path / "marker")
    with pytest.raises(UntrustedFileError) as error:
        load_checkpoint_file(str(path))
    copy = pickle.loads(pickle.dumps(error.value))
    assert str(copy) == str(error.value) and copy.found == error.value.found


@pytest.mark.parametrize("name", ["payload.pth", "payload.pkl"])
def test_the_opt_in_loads_it_and_warns(tmp_path, write_payload, name, caplog):
    path, marker = tmp_path / name, tmp_path / "marker"
    weights = _random_weights()
    write_payload(path, marker, weights)
    model = _Net()
    with caplog.at_level(logging.WARNING, logger="dino_d2.checkpoint.loading"):
        AtomicCheckpointer(model, unsafe_load=True).load(str(path))
    assert marker.exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in r.getMessage() and "--unsafe-load" in r.getMessage() for r in warnings)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def _detectron2_pkl(path, data, protocol):
    payload = pickle.dumps(data, protocol=protocol)
    if protocol == 2:  # as written under numpy 1, whose module was numpy.core
        payload = payload.replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(payload)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("layout", ["model_zoo", "caffe2"])
def test_detectron2_pkl_files_load_without_the_opt_in(tmp_path, protocol, layout):
    """Detectron2's model-zoo layout ({"model": arrays, "__author__", "matching_heuristics"})
    and a bare Caffe2 dict of blobs (with momentum blobs that are dropped)."""
    weights = _random_weights(seed=protocol)
    arrays = {k: v.numpy() for k, v in weights.items()}
    if layout == "model_zoo":
        data = {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
        data["extra"] = {"step": np.int64(7), "lr": np.float32(0.01), "ids": (1, 2), "s": {3}}
    else:
        data = {"blobs": {**arrays, "head.weight_momentum": np.zeros((2, 4), np.float32)}}
    path = tmp_path / "model.pkl"
    _detectron2_pkl(path, data, protocol)
    loaded = load_checkpoint_file(str(path))
    if layout == "model_zoo":
        assert loaded["extra"] == data["extra"]
    model = _Net()
    AtomicCheckpointer(model).load(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_released_checkpoint_contents_load_without_the_opt_in(tmp_path):
    """The authors' args (argparse.Namespace) and the numpy values of mmcv/EasyCV metadata."""
    path = tmp_path / "checkpoint0011_4scale.pth"
    meta = {"best": np.float64(0.5), "iter": np.int64(3), "dtype": np.dtype("float32")}
    meta["hist"] = np.arange(4, dtype=np.int32)
    args = argparse.Namespace(nheads=8, lr=1e-4)
    torch.save({"model": _random_weights(), "args": args, "meta": meta, "epoch": 11}, path)
    loaded = load_checkpoint_file(str(path))
    assert loaded["args"] == args and loaded["epoch"] == 11
    assert loaded["meta"]["best"] == 0.5 and loaded["meta"]["dtype"] == np.float32
    assert np.array_equal(loaded["meta"]["hist"], meta["hist"])


def test_a_pycls_file_loads_without_the_opt_in(tmp_path):
    weights = _random_weights()
    path = tmp_path / "resnet.pyth"
    torch.save({"model_state": weights, "epoch": 3}, path)
    model = _Net()
    AtomicCheckpointer(model).load(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def _config_tree(cfg):
    """A config as comparable text (partials compare by identity, their repr by content)."""
    return repr(OmegaConf.to_container(cfg, resolve=False))


def test_every_shipped_config_saved_as_yaml_loads_as_data(tmp_path):
    for name in list_configs():
        path = str(tmp_path / f"{name}.yaml")
        LazyConfig.save(get_config(name), path)
        assert _config_tree(load_config_file(path)) == _config_tree(LazyConfig.load(path)), name


@pytest.mark.parametrize(
    "value, tag",
    [
        ('!!python/object/apply:os.system ["touch {marker}"]', "object/apply:os.system"),
        ("!!python/object/apply:builtins.open [{marker}, w]", "object/apply:builtins.open"),
        ("!!python/object/new:builtins.open [{marker}, w]", "object/new:builtins.open"),
    ],
)
def test_a_yaml_config_that_would_run_code_is_refused(tmp_path, value, tag):
    marker = tmp_path / "marker"
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  num_classes: 3\n  hook: {value.format(marker=marker)}\n")
    with pytest.raises(UnsafeConfigError) as error:
        load_config_file(str(path))
    assert (
        str(path) in str(error.value) and tag in str(error.value) and "line 3" in str(error.value)
    )
    assert not marker.exists()


def test_the_config_pickle_fallback_is_checked_without_unpickling(tmp_path, write_payload):
    path, marker = tmp_path / "config.yaml.pkl", tmp_path / "marker"
    write_payload(path, marker)
    assert _complete_pickle(str(path)) and not marker.exists()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not _complete_pickle(str(path))
    assert not _complete_pickle(str(tmp_path / "missing.pkl"))
