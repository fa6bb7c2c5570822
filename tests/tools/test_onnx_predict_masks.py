"""tools/deploy/onnx_predict.py with masks: the numpy pasting equals PyTorch's (Mask DINO's
inference), the RLE round-trips through pycocotools, and a graph with a ``mask_logits`` output
has its masks drawn and written."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("deploy/onnx_predict")


def _torch_paste(logits, stride, image_size, output_size):
    """Mask DINO's pasting in PyTorch: upsample by the stride, crop the image, resize."""
    full = F.interpolate(logits[None], scale_factor=stride, mode="bilinear", align_corners=False)
    cropped = full[..., : image_size[0], : image_size[1]]
    return F.interpolate(cropped, size=output_size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(
    "mask_size, image_size, output_size",
    [((12, 17), (45, 66), (90, 132)), ((20, 20), (80, 77), (53, 51)), ((8, 9), (32, 36), (32, 36))],
)
def test_pasting_matches_pytorch(tool, mask_size, image_size, output_size):
    generator = torch.Generator().manual_seed(sum(mask_size))
    logits = 4 * torch.randn(5, *mask_size, generator=generator)
    expected = _torch_paste(logits, 4, image_size, output_size)
    masks, scores = tool._paste_masks(logits.numpy(), 4, image_size, output_size)
    inside = expected > 0
    assert masks.shape == tuple(inside.shape)
    # Equal up to float rounding: only pixels whose logit is within 1e-4 of 0 may differ.
    disagree = masks != inside.numpy()
    assert (expected.abs().numpy()[disagree] < 1e-4).all()
    probability = torch.where(inside, expected.sigmoid(), torch.zeros(()))
    expected_scores = probability.flatten(1).sum(1) / (inside.flatten(1).sum(1) + 1e-6)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)


def test_rle_round_trips_through_pycocotools(tool):
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 11)) > 0.5, np.ones((3, 4), bool), np.zeros((5, 2), bool)):
        rle = tool._mask_rle(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        decoded = mask_util.decode(mask_util.frPyObjects(rle, *rle["size"]))
        np.testing.assert_array_equal(decoded.astype(bool), mask)


def _constant_graph(path, outputs):
    """An ONNX graph with the export's two inputs and constant outputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes, infos = [], []
    for name, value in outputs.items():
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
        dtype = TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT
        infos.append(helper.make_tensor_value_info(name, dtype, list(value.shape)))
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, "H", "W"]),
        helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["N", 2]),
    ]
    graph = helper.make_graph(nodes, "masks", inputs, infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_masks_are_pasted_drawn_and_written(tool, tmp_path):
    pytest.importorskip("onnxruntime")
    # One 40 x 60 image, not resized (short edge 40); masks at stride 4: (10, 15).
    logits = np.full((1, 2, 10, 15), -8.0, np.float32)
    logits[0, 0, 2:6, 3:8] = 8.0
    logits[0, 1, 7:9, 10:14] = 8.0
    outputs = {
        "boxes": np.array([[[12, 8, 32, 24], [40, 28, 56, 36]]], np.float32),
        "scores": np.array([[0.9, 0.8]], np.float32),
        "classes": np.array([[1, 2]], np.int64),
        "mask_logits": logits,
    }
    model = tmp_path / "model.onnx"
    _constant_graph(model, outputs)
    info = {"input_format": "RGB", "resize": {"short_edge_length": 40, "max_size": 100}}
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(image)
    predictor = tool.OnnxPredictor(str(model), info)
    (found,) = predictor([tool.read_image(str(image), "RGB")])
    expected = _torch_paste(torch.from_numpy(logits[0]), 4, (40, 60), (40, 60)) > 0
    np.testing.assert_array_equal(found["masks"], expected.numpy())
    assert (found["scores"] < outputs["scores"][0]).all() and (found["scores"] > 0.7).all()

    results = tool.predict_images(predictor, [str(image)], str(tmp_path / "out"))
    detections = results["images"][0]["detections"]
    assert [d["class_id"] for d in detections] == [1, 2]
    for detection, mask in zip(detections, expected.numpy()):
        rle = detection["mask"]
        decoded = mask_util.decode(mask_util.frPyObjects(rle, *rle["size"])).astype(bool)
        np.testing.assert_array_equal(decoded, mask)
    with open(tmp_path / "out" / "detections.json") as f:
        assert json.load(f)["images"][0]["detections"][0]["mask"] == detections[0]["mask"]
    with Image.open(tmp_path / "out" / "grey.png") as png:
        drawn = np.asarray(png.convert("RGB")).astype(int)
    # Inside the first mask, 2 pixels away from its box's outline: the mask colour over grey.
    inside = expected[0].numpy().copy()
    inside[:10], inside[22:], inside[:, :14], inside[:, 30:] = False, False, False, False
    assert inside.sum() > 100
    assert (np.abs(drawn[inside] - 100).sum(axis=1) > 30).all()
    # Far from every box and mask, the image is unchanged.
    assert (drawn[30:, :8] == 100).all()
