"""A tiny random Mask DINO exported (ONNX through onnxruntime, and torch.export's pt2):
per-detection mask logits as an output, checked against eager at an unseen size and batch."""

import pytest
import torch

from detectron2.config import instantiate

from dino_d2.export.evaluate import ExportedDetector
from dino_d2.export.exporter import export_model, load_exported
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.verify import pad_images


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_masks_go_through_the_export(tiny_mask_dino_config, tmp_path, fmt):
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = instantiate(tiny_mask_dino_config().model).eval()
    graph = InferenceGraph(model)
    sample = pad_images(_images([(64, 96), (80, 70)]))
    verification = [pad_images(_images([(80, 70)], seed=1))]
    result = export_model(
        graph, sample, fmt, str(tmp_path), preprocessing={}, verification=verification
    )
    assert result.verification.passed, result.verification.summary()
    # The export's own verification compared the masks of the paired detections.
    assert result.verification.num_masks == result.verification.num_paired > 0
    assert result.verification.min_mask_iou >= 0.99
    assert "min mask IoU" in result.verification.summary()
    if fmt == "onnx":
        session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        assert names == ["boxes", "scores", "classes", "mask_logits"]
    images, sizes = pad_images(_images([(72, 100), (56, 64), (96, 48)], seed=2))
    outputs = [torch.as_tensor(o) for o in load_exported(result.path, fmt)(images, sizes)]
    with torch.no_grad():
        eager = model.detect(images, sizes, exact_batched=False)
    masks = eager.extras["mask_logits"]
    assert outputs[3].shape == masks.shape == (3, 10, 24, 25)
    torch.testing.assert_close(outputs[1], eager.scores, atol=1e-4, rtol=0)
    ours, theirs = outputs[3] > 0, masks > 0
    union = (ours | theirs).flatten(2).sum(-1)
    iou = (ours & theirs).flatten(2).sum(-1) / union.clamp(min=1)
    assert (iou[union > 0] >= 0.99).all()


def test_the_export_is_evaluated_through_the_models_own_postprocess(
    tiny_mask_dino_config, tmp_path
):
    # ExportedDetector (what `export_model.py --eval` runs through inference_on_dataset) hands
    # the graph's outputs, mask logits included, to MaskDINO.postprocess: pasted masks and
    # mask-rescored scores at each input's output size, as the eager model gives them.
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = instantiate(tiny_mask_dino_config().model).eval()
    graph = InferenceGraph(model)
    sample = pad_images(_images([(64, 96), (80, 70)]))
    result = export_model(graph, sample, "onnx", str(tmp_path), preprocessing={}, verification=[])
    detector = ExportedDetector(
        load_exported(result.path, "onnx"),
        graph.dtype,
        postprocess=model.postprocess,
        extra_names=graph.output_names(*sample)[3:],
    )
    inputs = [
        {"image": image, "height": 144, "width": 200} for image in _images([(72, 100)] * 2, seed=3)
    ]
    with torch.no_grad():
        eager = model([{**x, "image": x["image"].float()} for x in inputs])
    exported = detector(inputs)
    for ours, theirs in zip(exported, eager):
        ours, theirs = ours["instances"], theirs["instances"]
        assert ours.image_size == theirs.image_size == (144, 200)
        torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)
        union = (ours.pred_masks | theirs.pred_masks).flatten(1).sum(-1)
        inter = (ours.pred_masks & theirs.pred_masks).flatten(1).sum(-1)
        assert union.sum() > 0 and (inter[union > 0] / union[union > 0] >= 0.99).all()
