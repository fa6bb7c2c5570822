"""The model.json beside an export: read as data, each value checked."""

import json

import pytest
import torch

from dino_d2.measure import ExportInfoError, export_inputs


def test_an_exports_inputs_default_to_uint8_of_any_size(tmp_path):
    assert export_inputs(str(tmp_path / "model.onnx")) == (torch.uint8, 0)
    (tmp_path / "model.json").write_text(
        json.dumps({"input_dtype": "float32", "min_input_size": 64})
    )
    assert export_inputs(str(tmp_path / "model.onnx")) == (torch.float32, 64)


@pytest.mark.parametrize(
    "info, expected",
    [
        ({"input_dtype": "load"}, "input_dtype is 'load'; expected one of ['float32', 'uint8']"),
        ({"min_input_size": "__import__('os')"}, "min_input_size is \"__import__('os')\""),
        ({"min_input_size": -1}, "expected a non-negative integer"),
        ([1, 2], "holds a list; expected an object"),
    ],
)
def test_an_exports_json_is_read_as_checked_data(tmp_path, info, expected):
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ExportInfoError) as error:
        export_inputs(str(tmp_path / "model.pt2"))
    assert str(tmp_path / "model.json") in str(error.value) and expected in str(error.value)
