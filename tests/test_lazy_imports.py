"""Inference entry points import what inference needs: training, drawing, timm backbones and
scipy load on first use, and every name the packages export still resolves."""

import json
import os
import subprocess
import sys

import pytest

import dino_d2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(dino_d2.__file__)))

# Modules an inference process of a ResNet model never needs.
LAZY = (
    "timm",
    "scipy",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "openvino",
    "tensorboard",
    "torch.utils.tensorboard",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.solver",
    "detectron2.utils.visualizer",
    "dino_d2.engine.training",
    "dino_d2.engine.trainer",
    "dino_d2.engine.optimizer",
    "dino_d2.modeling.backbone.swin",
    "dino_d2.modeling.backbone.timm",
    "dino_d2.checkpoint.convert",
    "dino_d2.measure.flops",
    "dino_d2.measure.timing",
)

ENTRY_POINTS = (
    "dino_d2",
    "dino_d2.engine.predictor",
    "dino_d2.cli.demo",
    "dino_d2.export.exporter",
    "dino_d2.measure.inference_memory",
)


def _run(code: str) -> str:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _loaded_after_import(module: str):
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    return set(json.loads(_run(code)))


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_inference_entry_point_imports_no_training_drawing_or_timm(module):
    loaded = _loaded_after_import(module)
    assert module in loaded
    assert sorted(name for name in LAZY if name in loaded) == []


def test_the_check_sees_an_eager_import():
    """The same check flags what the training entry point does import."""
    loaded = _loaded_after_import("dino_d2.engine.training")
    assert {"detectron2.engine", "dino_d2.engine.trainer"} <= loaded


def test_lazy_names_resolve_to_their_modules():
    code = (
        "import json, sys\n"
        "import dino_d2.checkpoint as checkpoint, dino_d2.engine as engine\n"
        "import dino_d2.measure as measure, dino_d2.modeling as modeling\n"
        "from dino_d2.modeling import backbone\n"
        "names = {}\n"
        "for package in (checkpoint, engine, measure, modeling, backbone):\n"
        "    for name in package.__all__:\n"
        "        value = getattr(package, name)\n"
        "        names[f'{package.__name__}.{name}'] = getattr(value, '__module__', None)\n"
        "from dino_d2.modeling import SwinBackbone, TimmBackbone\n"
        "from dino_d2.engine import build_training\n"
        "assert SwinBackbone is backbone.SwinBackbone is sys.modules["
        "'dino_d2.modeling.backbone.swin'].SwinBackbone\n"
        "print(json.dumps(names))\n"
    )
    names = json.loads(_run(code))
    assert names["dino_d2.modeling.SwinBackbone"] == "dino_d2.modeling.backbone.swin"
    assert names["dino_d2.modeling.TimmBackbone"] == "dino_d2.modeling.backbone.timm"
    assert names["dino_d2.engine.build_training"] == "dino_d2.engine.training"
    assert names["dino_d2.checkpoint.convert_checkpoint"] == "dino_d2.checkpoint.convert"
    assert names["dino_d2.measure.count_macs"] == "dino_d2.measure.flops"


def test_unknown_name_is_an_attribute_error():
    import dino_d2.modeling

    with pytest.raises(AttributeError, match="dino_d2.modeling.*NoSuchBackbone"):
        dino_d2.modeling.NoSuchBackbone  # noqa: B018


def test_swin_builder_registered_without_timm():
    code = (
        "import json, sys\n"
        "import dino_d2\n"
        "from detectron2.modeling import BACKBONE_REGISTRY\n"
        "print(json.dumps(['build_swin_backbone' in BACKBONE_REGISTRY, 'timm' in sys.modules]))\n"
    )
    assert json.loads(_run(code)) == [True, False]
