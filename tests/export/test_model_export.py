"""The whole DINO inference exported: the graph equals DINO, every export proves itself at other
sizes and batch sizes, and the runtime without PyTorch gives tools/demo.py's detections."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import Backbone

from dino_d2.cli import export_model as export_cli
from dino_d2.export import exporter
from dino_d2.export.exporter import ExportError, export_model, random_verification
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.onnx import selection_probe
from dino_d2.export.ties import (
    forced_selection,
    forced_tokens,
    pair_detections,
    recorded_selections,
    unpaired_beyond_cut,
)
from dino_d2.export.verify import eager_detections

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is part of make test")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONNX_PREDICT = os.path.join(REPO, "tools", "deploy", "onnx_predict.py")
DEMO = os.path.join(REPO, "tools", "demo.py")


def _perturbed(model, seed=0):
    """Random weights moved off their initialization, so that no two scores tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    batch = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        batch[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=generator)
    return batch, torch.tensor(sizes)


@pytest.fixture(scope="module")
def tiny_model(tiny_dino_config):
    return _perturbed(instantiate(tiny_dino_config().model))


def _assert_same(reference, candidate, score_tolerance=1e-5, box_tolerance=1e-3):
    for (ref_boxes, ref_scores, ref_classes), (boxes, scores, classes) in zip(reference, candidate):
        scores_diff, boxes_diff, unpaired, theirs = pair_detections(
            (boxes, scores, classes), (ref_boxes, ref_scores, ref_classes), score_tolerance, 1e9
        )
        assert not unpaired and not theirs
        assert max(boxes_diff) <= box_tolerance


def test_the_graph_gives_dino_s_detections(tiny_model):
    graph = InferenceGraph(tiny_model.train())
    # The wrapper and the model it wraps are in eval mode (the exporters warn otherwise).
    assert not any(module.training for module in graph.modules())
    # One image: DINO as configured. A batch of different sizes: DINO with
    # exact_batched_inference=False (both send the padded batch through the backbone).
    for sizes in ([(70, 90)], [(96, 80), (70, 130), (65, 65)]):
        images, image_sizes = _images(sizes)
        with torch.no_grad():
            boxes, scores, classes = graph(images, image_sizes)
        assert boxes.shape == (len(sizes), 10, 4) and classes.dtype == torch.int64
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
        reference = eager_detections(tiny_model, images, image_sizes)
        _assert_same(reference, list(zip(boxes, scores, classes)), 0, 0)
    # The padding's values do not matter, float input in 0-255 gives the same.
    noisy = images.clone()
    noisy[1, :, 70:, :] = 255
    float_graph = InferenceGraph(tiny_model, input_dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(graph(noisy, image_sizes)[1], scores)
        torch.testing.assert_close(float_graph(images.float(), image_sizes)[1], scores)


def _proven_export(tiny_model, tmp_path, fmt, **options):
    """The tiny model exported to ``fmt`` and verified at other sizes (6 images, 10 detections
    each); returns the graph, the sample batch and the written model."""
    graph = InferenceGraph(tiny_model)
    sample = _images([(96, 128), (80, 100)])
    result = export_model(
        graph,
        sample,
        fmt,
        str(tmp_path),
        preprocessing={"input_format": "RGB"},
        verification=random_verification(graph, 96, 160),
        **options,
    )
    assert result.verification.passed, result.verification.summary()
    assert result.verification.num_detections == 6 * 10
    return graph, sample, result


def _probe_answering(indices):
    """A stand-in for an export's selection probe that answers ``indices`` for any batch."""
    return lambda images, image_sizes: indices


def test_tied_proposals_that_the_export_ranks_otherwise_are_put_in_its_order(
    tiny_model, tmp_path, monkeypatch
):
    """The probe reads the export's selected tokens. An export that ranks two tied proposals
    the other way round (emulated: the probe answers with two tokens swapped, and the eager
    model with that order gives the export's detections), or keeps another proposal tied at the
    k-th score, is verified against eager re-run with its selection; proposals that do not tie
    within the tolerance, or a token that the run does not have, are left to fail."""
    graph, sample, result = _proven_export(tiny_model, tmp_path, "onnx", msda_backend="gather")
    with recorded_selections(tiny_model) as selections:
        eager_detections(tiny_model, *sample)
    ours = selections[0]
    assert torch.equal(selection_probe(result.path)(*sample), ours.indices)

    swapped = ours.indices.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    probe = _probe_answering(swapped)
    scores = ours.enc_logits.amax(-1)
    gap = float((scores[:, 0] - scores[:, 1]).abs().max())
    assert gap > 1e-4
    args = [sample], [None], [ours]  # verification, references, eager selections
    assert exporter._in_export_selection_order(tiny_model, probe, *args, 1e-4) is None
    # Counted as tied (a tolerance above their gap): eager again, in the export's order.
    references, moved = exporter._in_export_selection_order(tiny_model, probe, *args, 2 * gap)
    order = torch.arange(ours.indices.shape[1]).repeat(len(swapped), 1)
    order[:, [0, 1]] = order[:, [1, 0]]
    with forced_selection(tiny_model, order):
        theirs = eager_detections(tiny_model, *sample)
    assert moved == 2 * len(swapped)
    _assert_same(theirs, references[0], score_tolerance=0, box_tolerance=0)
    with pytest.raises(AssertionError):
        _assert_same(eager_detections(tiny_model, *sample), references[0])

    another = ours.indices.clone()
    another[:, 0] = -1  # a token that the run does not have
    probe = _probe_answering(another)
    assert exporter._in_export_selection_order(tiny_model, probe, *args, 2 * gap) is None

    # At the k-th place, the best proposal that eager left out (scores as ranked: -inf on
    # padding, read through the selection's rank).
    selection = tiny_model.transformer.query_selection
    ranked = []
    with monkeypatch.context() as patch:
        patch.setattr(
            selection, "rank", lambda s: ranked.append(s) or type(selection).rank(selection, s)
        )
        eager_detections(tiny_model, *sample)
    left_out = ranked[0].scatter(1, ours.indices, float("-inf")).argmax(1)
    cut = ours.indices.clone()
    cut[:, -1] = left_out
    cut_gap = float((ranked[0].gather(1, left_out[:, None])[:, 0] - scores[:, -1]).abs().max())
    assert 0 < cut_gap < float("inf")
    probe = _probe_answering(cut)
    assert exporter._in_export_selection_order(tiny_model, probe, *args, cut_gap / 2) is None
    references, places = exporter._in_export_selection_order(tiny_model, probe, *args, 2 * cut_gap)
    assert places == len(cut)
    with forced_tokens(tiny_model, cut), recorded_selections(tiny_model) as substituted:
        theirs = eager_detections(tiny_model, *sample)
    assert torch.equal(substituted[0].indices, cut)
    _assert_same(theirs, references[0], score_tolerance=0, box_tolerance=0)
    with pytest.raises(AssertionError):
        _assert_same(eager_detections(tiny_model, *sample), references[0])
    assert "rank" not in vars(selection)  # forced_tokens leaves the model as it was


def test_a_pt2_export_is_proven_and_its_query_selection_can_be_read(tiny_model, tmp_path):
    """The ExportedProgram passes its verification, and its probe (the program interpreted up to
    its first top-k) gives the tokens that eager selected, in eager's order; the verification
    takes it, as it takes the ONNX probe for onnxruntime."""
    _, sample, result = _proven_export(tiny_model, tmp_path, "pt2")
    probe = exporter.export_selection_probe(result.path, "pt2")
    for images, image_sizes in [sample, _images([(70, 150), (96, 96), (90, 120)], seed=1)]:
        with recorded_selections(tiny_model) as selections:
            eager_detections(tiny_model, images, image_sizes)
        assert torch.equal(probe(images, image_sizes), selections[0].indices)
    assert exporter.export_selection_probe(str(tmp_path / "model_aoti.pt2"), "aoti") is None


def test_a_failed_verification_counts_the_eager_selection_s_ties(tiny_model, tmp_path, monkeypatch):
    """An export whose boxes differ fails its verification; the note counts the near-tied
    proposals of what the verification's own eager run selected for the first batch, and the
    eager model runs once a batch."""
    graph = InferenceGraph(tiny_model)
    verification = random_verification(graph, 96, 160)
    unshifted = exporter.detections_of_outputs

    def shift(outputs, image_sizes):
        return [(boxes + 5.0, *rest) for boxes, *rest in unshifted(outputs, image_sizes)]

    monkeypatch.setattr(exporter, "detections_of_outputs", shift)
    eager_runs = []

    def counted(*args):
        eager_runs.append(args)
        return eager_detections(*args)

    monkeypatch.setattr(exporter, "eager_detections", counted)
    with recorded_selections(tiny_model) as selections:
        eager_detections(tiny_model, *verification[0])
    ours = selections[0]
    total = ours.enc_logits.shape[0] * ours.enc_logits.shape[1]
    for tolerance, ties in [(1e3, total - ours.enc_logits.shape[0]), (0.0, None)]:
        result = export_model(
            graph,
            _images([(96, 128), (80, 100)]),
            "onnx",
            str(tmp_path),
            preprocessing={},
            verification=verification,
            msda_backend="gather",
            overwrite=True,
            score_tolerance=tolerance,
        )
        comparison = result.verification
        assert not comparison.passed
        # One eager run a batch: the selection the probe compares and the ties counted are
        # those of the references' own runs, and nothing moved to run again for.
        assert len(eager_runs) == len(verification)
        eager_runs.clear()
        notes = [note for note in comparison.notes if "the encoder selected" in note]
        expected = [f"{ties} of the {total} proposals"] if ties else []
        assert [note.split(" that ")[0] for note in notes] == expected, comparison.notes


def test_onnx_gather_export_is_proven_at_other_sizes(tiny_model, tmp_path):
    graph, sample, result = _proven_export(tiny_model, tmp_path, "onnx", msda_backend="gather")
    model = onnx.load(result.path)
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" not in ops and "Gather" in ops
    assert [i.name for i in model.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "classes"]
    # The exported sizes are symbolic: batch, height and width.
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]
    # Nothing is overwritten without overwrite=True.
    with pytest.raises(ExportError, match="exist.*--overwrite"):
        export_model(graph, sample, "onnx", str(tmp_path), preprocessing={}, verification=[])


def test_onnx_node_export_runs_dino_d2_s_kernel_in_onnxruntime_and_openvino(
    tiny_model, tmp_path, monkeypatch
):
    openvino = pytest.importorskip("openvino", reason="the openvino extra is part of make test")
    from dino_d2.export import msda_node
    from dino_d2.export.exporter import load_exported, load_onnxruntime, load_openvino

    assert msda_node.onnxruntime_library() is not None, "make fetches onnxruntime's headers"
    assert msda_node.openvino_library() is not None, "setup.py builds it when openvino is there"
    # Verified in onnxruntime with dino_d2's custom op library: the kernel gives the model's
    # detections at every verification size and batch.
    _, _, result = _proven_export(tiny_model, tmp_path, "onnx", msda_backend="node")
    model = onnx.load(result.path)
    assert msda_node.has_node(model)
    ops = [f"{node.domain}::{node.op_type}" for node in model.graph.node]
    # One node per deformable attention: the encoder layer and the decoder layer.
    assert ops.count("dino_d2::MultiScaleDeformableAttention") == 2
    assert "::GridSample" not in ops
    # The same file in OpenVINO, and saved as OpenVINO IR (which still holds the node, and
    # load_openvino adds the extension): the same detections as in onnxruntime.
    core = openvino.Core()
    msda_node.add_to_openvino(core)
    xml = str(tmp_path / "ir" / "model.xml")
    openvino.save_model(core.read_model(result.path), xml, compress_to_fp16=False)
    assert msda_node.has_node(xml)
    images, image_sizes = _images([(96, 128), (70, 100)], seed=5)
    from_ort = load_onnxruntime(result.path)(images, image_sizes)
    from_ir = load_openvino(xml)(images, image_sizes)
    from_onnx = load_openvino(result.path)(images, image_sizes)
    for a, b, c in zip(from_ort, from_ir, from_onnx):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b, c)
    # Built without onnxruntime's headers, load_exported runs the file in OpenVINO.
    monkeypatch.setattr(msda_node, "onnxruntime_library", lambda: None)
    for a, b in zip(load_exported(result.path, "onnx")(images, image_sizes), from_onnx):
        torch.testing.assert_close(a, b)


class _BranchingBackbone(Backbone):
    """A backbone whose control flow depends on the image values: not exportable."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=8, padding=1)
        self._out_features = ["res3", "res4", "res5"]
        self._out_feature_channels = {"res3": 16, "res4": 16, "res5": 16}
        self._out_feature_strides = {"res3": 8, "res4": 16, "res5": 32}

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # data-dependent: torch.export cannot trace it
            x = -x
        return {"res3": x, "res4": F.max_pool2d(x, 2), "res5": F.max_pool2d(x, 4)}


def test_a_module_that_cannot_be_exported_is_named(tiny_dino_config, tmp_path):
    cfg = tiny_dino_config()
    cfg.model.backbone.bottom_up = L(_BranchingBackbone)()
    cfg.model.backbone.in_features = ["res3", "res4", "res5"]
    graph = InferenceGraph(instantiate(cfg.model).eval())
    with pytest.raises(ExportError) as error:
        export_model(
            graph,
            _images([(96, 128), (80, 100)]),
            "pt2",
            str(tmp_path),
            preprocessing={},
            verification=[],
        )
    message = str(error.value)
    assert "backbone.bottom_up (_BranchingBackbone)" in message, message
    assert "data-dependent" in message.lower() or "guard" in message.lower(), message


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory, tiny_dino_config):
    """The digits config with saved (perturbed random) weights, and three images."""
    root = tmp_path_factory.mktemp("digits_export")
    config = os.path.join(REPO, "configs", "dino_r18_digits.py")
    cfg = LazyConfig.load(config)
    model = _perturbed(instantiate(cfg.model))
    weights = str(root / "weights.pth")
    DetectionCheckpointer(model, save_dir=str(root)).save("weights")
    generator = np.random.default_rng(0)
    images = []
    for name, (h, w) in {"a.png": (240, 320), "b.png": (300, 200), "c.png": (120, 500)}.items():
        array = generator.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / name)
        images.append(str(root / name))
    return {"root": root, "config": config, "weights": weights, "images": images}


def _export(setup, fmt, *extra, name=None):
    out = setup["root"] / (name or f"export_{fmt}")
    argv = [
        "--config-file",
        setup["config"],
        "--format",
        fmt,
        "--output",
        str(out),
        "--sample-image",
        setup["images"][0],
        *extra,
        f"train.init_checkpoint={setup['weights']}",
    ]
    return export_cli.main(argv), out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_digits_export_from_the_command_line(digits_setup, fmt, capsys):
    code, out = _export(digits_setup, fmt)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Verification against PyTorch" in printed and "PASS" in printed
    name = "model.onnx" if fmt == "onnx" else "model.pt2"
    info = json.loads((out / name.replace(os.path.splitext(name)[1], ".json")).read_text())
    assert info["input_format"] == "RGB" and info["input_dtype"] == "uint8"
    assert info["resize"]["short_edge_length"] == 192 and info["resize"]["max_size"] == 320
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["min_input_size"] == 65
    assert (out / name).is_file()


def _table(detections):
    """A detections.json list as the (boxes, scores, classes) tensors pair_detections takes."""
    return tuple(torch.tensor([d[key] for d in detections]) for key in ("box", "score", "class_id"))


def test_onnx_runtime_without_torch_gives_the_demo_detections(digits_setup):
    onnx_dir = digits_setup["root"] / "export_onnx"
    if not (onnx_dir / "model.onnx").exists():
        assert _export(digits_setup, "onnx")[0] == 0
    runtime_out = digits_setup["root"] / "onnx_predict"
    # A meta-path finder makes any import of torch fail inside the runtime's process.
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch imported by the ONNX runtime tool')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = {[ONNX_PREDICT]!r} + sys.argv[1:]\n"
        f"exec(compile(open({ONNX_PREDICT!r}).read(), {ONNX_PREDICT!r}, 'exec'))\n"
    )
    args = ["--model", str(onnx_dir / "model.onnx"), "--input", *digits_setup["images"]]
    args += ["--output", str(runtime_out), "--score-threshold", "0"]
    result = subprocess.run(
        [sys.executable, "-c", blocker, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    demo_out = digits_setup["root"] / "demo"
    demo = subprocess.run(
        [
            sys.executable,
            DEMO,
            "--config-file",
            digits_setup["config"],
            "--checkpoint",
            digits_setup["weights"],
            "--input",
            *digits_setup["images"],
            "--output",
            str(demo_out),
            "--score-threshold",
            "0",
            # The export runs in float32: so does the demo here (its default is "auto").
            "train.amp.eval_precision=float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    ours = json.loads((runtime_out / "detections.json").read_text())["images"]
    theirs = json.loads((demo_out / "detections.json").read_text())["images"]
    assert [i["file"] for i in ours] == [i["file"] for i in theirs]
    for mine, reference in zip(ours, theirs):
        assert (mine["height"], mine["width"]) == (reference["height"], reference["width"])

        # Both tools write scores rounded to four decimals: two scores 1e-7 apart can be written
        # 1e-4 apart (and a little more in float32), so the tolerance is 1e-4 plus that rounding.
        tolerance = 2e-4
        scores, boxes, unpaired, theirs_unpaired = pair_detections(
            _table(mine["detections"]), _table(reference["detections"]), tolerance, 0.02
        )
        assert len(mine["detections"]) == len(reference["detections"]) == 50
        # Every detection pairs, except ties at the top-50 cut, which either run may keep.
        cut = min(d["score"] for d in mine["detections"] + reference["detections"])
        assert not unpaired_beyond_cut(unpaired + theirs_unpaired, cut, tolerance)
        assert (runtime_out / mine["visualization"]).is_file()


def test_onnx_predict_runs_a_node_export_with_dino_d2_s_library(
    digits_setup, tmp_path, capsys, load_tool
):
    from dino_d2.export import msda_node

    onnx_dir = digits_setup["root"] / "export_onnx"
    if not (onnx_dir / "model.onnx").exists():
        assert _export(digits_setup, "onnx")[0] == 0
    code, node_dir = _export(digits_setup, "onnx", "--msda-backend", "node", name="export_node")
    printed = capsys.readouterr().out
    assert code == 0 and "PASS" in printed, printed
    tool = load_tool("deploy/onnx_predict")
    base = ["--input", *digits_setup["images"], "--score-threshold", "0"]
    # Without the library onnxruntime cannot load the file: the tool says what to give it.
    assert (
        tool.main(["--model", str(node_dir / "model.onnx"), "--output", str(tmp_path / "x")] + base)
        == 2
    )
    assert "--custom-op-library" in capsys.readouterr().err
    library = msda_node.onnxruntime_library()
    assert library is not None, "make fetches onnxruntime's headers"
    runs = {
        "grid_sample": ["--model", str(onnx_dir / "model.onnx")],
        "node": ["--model", str(node_dir / "model.onnx"), "--custom-op-library", library],
    }
    detections = {}
    for name, args in runs.items():
        assert tool.main(args + ["--output", str(tmp_path / name)] + base) == 0
        images = json.loads((tmp_path / name / "detections.json").read_text())["images"]
        detections[name] = [image["detections"] for image in images]
    # The two forms of the attention agree to float rounding (and the scores' four decimals),
    # except ties at the top-50 cut, which either run may keep.
    for mine, reference in zip(detections["node"], detections["grid_sample"]):
        _, _, unpaired, theirs = pair_detections(_table(mine), _table(reference), 2e-4, 0.02)
        cut = min(d["score"] for d in mine + reference)
        assert len(mine) == len(reference) == 50
        assert not unpaired_beyond_cut(unpaired + theirs, cut, 2e-4)


def test_a_wrong_input_gets_a_message_that_states_the_expected_input(digits_setup):
    """What onnxruntime says, from the graph's declared inputs, to any program that runs it."""
    import onnxruntime

    onnx_dir = digits_setup["root"] / "export_onnx"
    if not (onnx_dir / "model.onnx").exists():
        assert _export(digits_setup, "onnx")[0] == 0
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"))
    good = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    sizes = np.array([[96, 96]], dtype=np.int64)
    cases = [
        ({"images": np.zeros((1, 4, 96, 96), np.uint8), "image_sizes": sizes}, r"Expected: 3"),
        ({"images": good.astype(np.float32), "image_sizes": sizes}, r"expected: \(tensor\(uint8"),
        ({"images": good}, "image_sizes"),
    ]
    for feed, expected in cases:
        with pytest.raises(Exception, match=expected):
            session.run(None, feed)
    boxes = session.run(None, {"images": good, "image_sizes": sizes})[0]
    assert boxes.shape == (1, 50, 4)


def test_the_runtime_tool_reports_bad_inputs(digits_setup, tmp_path):
    onnx_dir = digits_setup["root"] / "export_onnx"
    if not (onnx_dir / "model.onnx").exists():
        assert _export(digits_setup, "onnx")[0] == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    runs = {
        "cannot read image": [str(broken)],
        "no image matches": [str(tmp_path / "*.jpg")],
    }
    for expected, inputs in runs.items():
        result = subprocess.run(
            [sys.executable, ONNX_PREDICT, "--model", str(onnx_dir / "model.onnx")]
            + ["--input", *inputs, "--output", str(tmp_path / "out"), "--overwrite"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_a_backbone_that_declares_it_cannot_be_exported_stops_at_once(tmp_path):
    from dino_d2.model_zoo import get_config

    cfg = get_config("dino_swin_tiny_224_4scale_12ep.py")
    graph = InferenceGraph(instantiate(cfg.model).eval())
    with pytest.raises(ExportError, match=r"module backbone.bottom_up \(SwinBackbone\) pads"):
        export_model(
            graph,
            _images([(96, 128), (80, 100)]),
            "onnx",
            str(tmp_path),
            preprocessing={},
            verification=[],
        )
    assert not os.listdir(tmp_path)


def test_msda_backend_flag_and_its_deprecated_name():
    base = ["--config-file", "c.py", "--output", "out"]
    assert export_cli.parse_args(base).msda_backend == "grid_sample"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert export_cli.parse_args(base + ["--msda-backend", "gather"]).msda_backend == "gather"
    with pytest.warns(DeprecationWarning, match="use --msda-backend"):
        args = export_cli.parse_args(base + ["--msda-impl", "gather"])
    assert args.msda_backend == "gather"
    with pytest.raises(SystemExit):
        export_cli.parse_args(base + ["--msda-backend", "kernel"])


def test_the_node_backend_keeps_its_former_name():
    base = ["--config-file", "c.py", "--output", "out"]
    assert export_cli.parse_args(base).runtime == "onnxruntime"
    # "openvino" named the node when only OpenVINO ran it; both runtimes run it now.
    for name in ("node", "openvino"):
        args = export_cli.parse_args(base + ["--msda-backend", name])
        assert (args.msda_backend, args.runtime) == ("node", "onnxruntime")
    args = export_cli.parse_args(base + ["--msda-backend", "node", "--runtime", "openvino"])
    assert args.runtime == "openvino"
