"""Clear errors, nothing written on failure, and the command-line tool end to end."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from checkpoint_layouts import SMALL, authors_state_dict, build_model, detrex_state_dict

from dino_d2.checkpoint import (
    ConversionError,
    UntrustedFileError,
    convert_checkpoint,
    load_checkpoint_file,
    save_checkpoint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWIN_SMALL = [
    "model.backbone.bottom_up.embed_dim=8",
    "model.backbone.bottom_up.depths=[2,2,2,2]",
    "model.backbone.bottom_up.num_heads=[1,2,4,8]",
]


@pytest.fixture(scope="module")
def idea_source():
    return authors_state_dict(build_model(SMALL).state_dict())


def test_unknown_layout_names_what_it_saw_and_what_it_knows(idea_source):
    with pytest.raises(ConversionError) as error:
        convert_checkpoint("idea", {"weights": {}, "step": 3})
    message = str(error.value)
    assert "top-level keys 'step', 'weights'" in message
    for source in ("idea", "detrex", "easycv", "torchvision-resnet", "swin"):
        assert f"{source}:" in message
    with pytest.raises(ConversionError, match=r"looks like the 'idea' layout \(--source idea\)"):
        convert_checkpoint("detrex", {"model": idea_source})
    with pytest.raises(ConversionError, match="unknown source 'mmdet'"):
        convert_checkpoint("mmdet", {"model": idea_source})


def test_missing_tensor_names_the_key_and_the_layout(idea_source):
    source = dict(idea_source)
    del source["transformer.decoder.layers.1.norm3.weight"]
    with pytest.raises(ConversionError) as error:
        convert_checkpoint("idea", {"model": source})
    assert str(error.value) == (
        "the checkpoint lacks 'transformer.decoder.layers.1.norm3.weight', which the 'idea' "
        "layout expects for the model key 'transformer.decoder.layers.1.ffn.norm.weight'"
    )


def test_wrong_shape_names_key_got_and_expected(idea_source):
    source = dict(idea_source)
    source["transformer.encoder.layers.1.linear2.weight"] = torch.zeros(32, 50)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint("idea", {"model": source})
    assert str(error.value) == (
        "shape mismatch: 'transformer.encoder.layers.1.linear2.weight' gives "
        "'transformer.encoder.layers.1.ffn.linear2.weight' the shape (32, 50), "
        "the model expects (32, 48)"
    )
    source = dict(idea_source)
    source["label_enc.weight"] = source["label_enc.weight"][:50]
    with pytest.raises(
        ConversionError, match=r"'label_enc.weight' of shape \(50, 32\) cannot give"
    ):
        convert_checkpoint("idea", {"model": source})


def test_tensors_without_a_place_are_reported(idea_source):
    source = dict(idea_source)
    source["transformer.two_stage_wh_embedding.weight"] = torch.zeros(1, 2)
    with pytest.raises(
        ConversionError, match="1 tensors .* 'transformer.two_stage_wh_embedding.weight'"
    ):
        convert_checkpoint("idea", {"model": source})


def test_nothing_is_written_on_failure(idea_source, tmp_path):
    result = convert_checkpoint("idea", {"model": idea_source})
    path = tmp_path / "out.pth"
    path.write_bytes(b"previous")
    # Dropping an override: the model no longer fits the weights (its FFN is the config's 2048).
    result.overrides = [o for o in result.overrides if "encoder.layer.ffn_dim" not in o]
    with pytest.raises(ConversionError, match="do not load strictly"):
        save_checkpoint(result, str(path))
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.pth"]


def test_shared_heads_that_differ_are_caught_before_writing(tmp_path):
    state = build_model(SMALL + ["model.transformer.decoder.share_heads=False"]).state_dict()
    result = convert_checkpoint("detrex", {"model": detrex_state_dict(state)})
    result.overrides.remove("model.transformer.decoder.share_heads=False")
    with pytest.raises(ConversionError, match="differ from the converted tensors"):
        save_checkpoint(result, str(tmp_path / "out.pth"))
    assert os.listdir(tmp_path) == []


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_command_line_end_to_end(tmp_path):
    overrides = SWIN_SMALL + SMALL + ["model.transformer.decoder.share_heads=False"]
    state = build_model(overrides, config="dino_swin_tiny_224_4scale_12ep.py").state_dict()
    source = tmp_path / "detrex.pth"
    torch.save({"model": detrex_state_dict(state), "iteration": 10}, source)
    output = tmp_path / "dino_d2.pth"

    failed = run_tool("--source", "idea", str(source), str(output))
    assert failed.returncode == 1 and not output.exists()
    assert "not in the 'idea' layout" in failed.stderr and "--source detrex" in failed.stderr

    done = run_tool("--source", "detrex", str(source), str(output))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "config: configs/dino_swin_tiny_224_4scale_12ep.py"
    assert lines[-1].startswith("config overrides: ")
    printed = lines[-1][len("config overrides: ") :].replace("'", "").split()
    expected = overrides + [
        "model.transformer.position_embedding.temperature=10000",
        "model.transformer.position_embedding.offset=-0.5",
    ]
    assert sorted(printed) == sorted(expected)
    converted = torch.load(output, weights_only=True)["model"]
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], v) for k, v in state.items())


class Opaque:
    """A pickled object that the safe loader refuses."""


def test_loading_files_with_args_safely(idea_source, tmp_path):
    path = str(tmp_path / "checkpoint0011.pth")
    args = argparse.Namespace(nheads=8, pe_temperatureH=20, pe_temperatureW=20)
    torch.save({"model": {}, "ema_model": idea_source, "epoch": 11, "args": args}, path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint["args"].nheads == 8
    result = convert_checkpoint("idea", checkpoint, use_ema=True)
    assert sorted(result.overrides) == sorted(SMALL)
    with pytest.raises(ConversionError, match="no 'ema_model'"):
        convert_checkpoint("easycv", {"state_dict": idea_source}, use_ema=True)

    torch.save({"model": {}, "meta": Opaque()}, path)
    with pytest.raises(UntrustedFileError, match="--unsafe-load"):
        load_checkpoint_file(path)
    assert isinstance(load_checkpoint_file(path, unsafe=True)["meta"], Opaque)
