"""The DINO meta-architecture: Detectron2 contract, batch invariance, yacs, learning."""

from statistics import mean

import pytest
import torch

from detectron2.config import get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dino_d2.config import add_dino_config


@pytest.fixture(name="tiny_model")
def tiny_model_fixture(tiny_dino_config):
    """Factory of small DINOs (tests/conftest.py) with 2 decoder layers and 20 queries;
    keyword arguments set dotted keys of ``cfg.model``."""

    def build(**overrides):
        cfg = tiny_dino_config(decoder_layers=2, num_queries=20, num_select=50)
        for key, value in overrides.items():
            node, parts = cfg.model, key.split(".")
            for part in parts[:-1]:
                node = node[part]
            node[parts[-1]] = value
        torch.manual_seed(0)
        return instantiate(cfg.model)

    return build


def _image(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def _instances(h, w, boxes, classes):
    instances = Instances((h, w))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor(classes)
    return instances


def _detections(output):
    instances = output["instances"]
    order = instances.scores.argsort(descending=True)
    return (
        instances.scores[order],
        instances.pred_boxes.tensor[order],
        instances.pred_classes[order],
    )


def test_batched_inference_equals_one_at_a_time(tiny_model):
    model = tiny_model().eval()
    images = [_image(100, 140, 1), _image(64, 200, 2), _image(130, 90, 3)]
    with torch.no_grad():
        batched = model([{"image": im} for im in images])
        single = [model([{"image": im}])[0] for im in images]
    for b, s in zip(batched, single):
        for x, y in zip(_detections(b), _detections(s)):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_padding_masks_follow_each_image_size(tiny_model):
    model = tiny_model().eval()
    images = model.preprocess_image([{"image": _image(100, 140, 1)}, {"image": _image(64, 200, 2)}])
    sizes = torch.tensor(images.image_sizes)
    for exact in (True, False):
        _, masks = model.extract_features(images.tensor, sizes, exact_batched=exact)
        for mask, stride in zip(masks, [8, 16, 32, 64]):
            assert not mask[0, : -(-100 // stride), : -(-140 // stride)].any()
            assert mask[0, -(-100 // stride) :].all() and mask[0, :, -(-140 // stride) :].all()
            assert not mask[1, : -(-64 // stride), : -(-200 // stride)].any()


def test_forward_is_detect_then_postprocess(tiny_model):
    """forward's Instances are detect's detections of the padded batch, and exact batching is
    chosen per call without touching the model."""
    model = tiny_model().eval()
    images = [_image(100, 140, 1), _image(64, 200, 2)]
    padded = torch.zeros(2, 3, 100, 200)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    sizes = torch.tensor([[100, 140], [64, 200]])
    with torch.no_grad():
        outputs = model([{"image": im} for im in images])
        exact = model.detect(padded, sizes)
        plain = model.detect(padded, sizes, exact_batched=False)
        alone = model.detect(padded[1:, :, :64], sizes[1:])
    assert model.exact_batched_inference
    for i, output in enumerate(outputs):
        instances = output["instances"]
        boxes = Boxes(exact.boxes[i].clone())
        boxes.clip(tuple(sizes[i].tolist()))  # detector_postprocess clips to the image
        torch.testing.assert_close(instances.scores, exact.scores[i])
        torch.testing.assert_close(instances.pred_boxes.tensor, boxes.tensor)
        assert torch.equal(instances.pred_classes, exact.classes[i])
    torch.testing.assert_close(exact.scores[1], alone.scores[0], atol=1e-4, rtol=1e-4)
    # The padded batch through the backbone at once: the second image sees the padding.
    assert not torch.allclose(plain.scores[1], alone.scores[0], atol=1e-4, rtol=1e-4)


def test_detections_are_rescaled_to_the_requested_size(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():
        (small,) = model([{"image": _image(64, 96, 1)}])
        (large,) = model([{"image": _image(64, 96, 1), "height": 128, "width": 192}])
    assert large["instances"].image_size == (128, 192)
    torch.testing.assert_close(
        _detections(large)[1], 2 * _detections(small)[1], atol=1e-4, rtol=1e-4
    )


def test_training_with_an_image_without_objects(tiny_model):
    model = tiny_model().train()
    batch = [
        {"image": _image(64, 80, 1), "instances": _instances(64, 80, [[4, 4, 40, 30]], [3])},
        {"image": _image(72, 64, 2), "instances": _instances(72, 64, [], [])},
    ]
    batch[1]["instances"].gt_boxes = Boxes(torch.zeros(0, 4))
    batch[1]["instances"].gt_classes = torch.zeros(0, dtype=torch.int64)
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    empty = [
        {"image": _image(64, 80, 1), "instances": batch[1]["instances"]},
    ]
    empty[0]["instances"] = Instances(
        (64, 80), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.int64)
    )
    losses_empty = model(empty)
    assert set(losses_empty) == set(losses)
    sum(losses_empty.values()).backward()
    assert model.denoising.label_enc.weight.grad is not None


def test_mismatched_parts_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="num_classes is 80"):
        tiny_model(**{"criterion.num_classes": 91})
    with pytest.raises(ValueError, match="transformer.num_levels"):
        tiny_model(**{"transformer.num_levels": 5})


def test_yacs_config_builds_dino():
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DINO"
    cfg.MODEL.DEVICE = "cpu"
    # The defaults come from the LazyConfig: the authors' recipe.
    assert cfg.MODEL.RESNETS.OUT_FEATURES == ["res3", "res4", "res5"]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.DINO.transformer.query_selection.num_queries == 900
    assert dict(cfg.MODEL.DINO.criterion.losses) == {
        "loss_class": 1.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
    }
    assert "bottom_up" not in cfg.MODEL.DINO.backbone and "_target_" not in cfg.MODEL.DINO
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d = cfg.MODEL.DINO
    d.backbone.num_groups = 8
    t = d.transformer
    t.embed_dim, t.position_embedding.num_pos_feats = 64, 32
    t.encoder.layer.num_heads = t.decoder.layer.num_heads = 4
    t.encoder.layer.ffn_dim = t.decoder.layer.ffn_dim = 64
    t.encoder.num_layers, t.decoder.num_layers, t.query_selection.num_queries = 1, 2, 10
    d.denoising.dn_number = 4
    d.num_classes = 5
    model = build_model(cfg)
    assert type(model).__name__ == "DINO" and model.num_classes == 5
    assert model.transformer.position_embedding.temperature == 20
    # Values derived in the LazyConfig follow what the yacs config set.
    assert model.transformer.encoder.embed_dim == 64 and model.criterion.num_decoder_layers == 2
    assert model.transformer.decoder.num_classes == model.denoising.num_classes == 5
    model.train()
    losses = model(
        [{"image": _image(64, 80, 1), "instances": _instances(64, 80, [[4, 4, 40, 30]], [3])}]
    )
    assert all(torch.isfinite(v) for v in losses.values())


def test_yacs_config_rejects_an_unknown_key():
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DINO"
    cfg.MODEL.DINO.transformer.query_selection.num_query = 3
    with pytest.raises(KeyError, match="MODEL.DINO.transformer.query_selection.num_query is not"):
        build_model(cfg)
    # The stacks still take their layer's old keywords for one release (deprecated), so a typo
    # there is caught when the stack is built, naming the key.
    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DINO"
    cfg.MODEL.DINO.transformer.encoder.num_layer = 3
    with pytest.raises(TypeError, match=r"DeformableEncoder got unexpected .* \['num_layer'\]"):
        build_model(cfg)


def test_tiny_dino_overfits_one_image(tiny_model):
    """The detection (matching) losses fall by 90%; the denoising losses, whose noisy queries
    are drawn anew each step and so cannot be memorized, still fall."""
    torch.manual_seed(0)
    model = tiny_model(**{"backbone.bottom_up.freeze_at": 0}).train()
    sample = {
        "image": _image(64, 64, 7),
        "instances": _instances(64, 64, [[4, 6, 30, 40], [34, 20, 60, 58]], [1, 7]),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    matching, denoising = [], []
    for _ in range(150):
        losses = model([sample])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        matching.append(sum(v.item() for k, v in losses.items() if "_dn" not in k))
        denoising.append(sum(v.item() for k, v in losses.items() if "_dn" in k))
    assert mean(matching[-10:]) < 0.1 * mean(matching[:5]), (matching[:5], matching[-10:])
    assert mean(denoising[-10:]) < mean(denoising[:5]), (denoising[:5], denoising[-10:])
