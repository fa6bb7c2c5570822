"""tools/verify_maskdino_conversion.py without the authors' code: its refusals. (The parity run
itself needs an IDEA-Research/MaskDINO checkout and the Mask DINO project; see the report of
the branch that added it for the measured differences.)"""

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("verify_maskdino_conversion")


@pytest.mark.parametrize("side, value", [("--height", "250"), ("--width", "0")])
def test_image_sides_must_be_multiples_of_32(tool, capsys, side, value):
    with pytest.raises(SystemExit):
        tool.parse_args(["--authors-repo", "x", side, value])
    assert "multiple of 32" in capsys.readouterr().err


def test_a_folder_that_is_not_a_checkout_is_named(tool, tmp_path):
    with pytest.raises(SystemExit, match="not a MaskDINO checkout"):
        tool.build_authors_model(str(tmp_path), "configs/x.yaml")
