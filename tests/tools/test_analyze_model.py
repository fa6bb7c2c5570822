import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "analyze_model.py")
CONFIG = os.path.join(ROOT, "configs", "dino_r50_4scale_12ep.py")


def _run(*args):
    result = subprocess.run(
        [sys.executable, TOOL, "--config-file", CONFIG, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_r50_4scale_has_the_published_parameter_count():
    out = _run("--tasks", "parameter", "train.device=cpu")
    total, backbone = map(float, re.search(r"([\d.]+)M total, ([\d.]+)M backbone", out).groups())
    # EasyCV lists 47M in total and 23M in the backbone for DINO-R50.
    assert 46.5 < total < 47.5 and 23.0 < backbone < 24.0, out


def test_flops_include_the_deformable_attention():
    out = _run(
        "--tasks",
        "flop",
        "--height",
        "64",
        "--width",
        "96",
        "train.device=cpu",
        "model.transformer.encoder.num_layers=1",
        "model.transformer.decoder.num_layers=1",
    )
    assert re.search(r"GFLOPs at 64x96: [\d.]+", out), out
    assert re.search(r"ms_deform_attn: [\d.]+", out), out
