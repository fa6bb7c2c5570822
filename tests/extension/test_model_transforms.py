"""The CPU fast path and the export seen from outside the package, as an extension sees them:
forward hooks fire, a replaced Linear is honoured, an extra head reaches the exported graph,
and the transformed model gives the plain model's detections."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.config import instantiate

from dino_d2.measure.parity import fast_path_parity, perturb_frozen_batchnorm
from dino_d2.export.exporter import export_model
from dino_d2.export.graph import InferenceGraph
from dino_d2.export.verify import pad_images
from dino_d2.layers.fast_path import optimize_for_cpu_inference


class LoRALinear(nn.Linear):
    """``W x + b + B A x``: a low-rank adapter on a frozen Linear, as LoRA adds one."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(1)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator))
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, generator=generator))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


class BoxAreaHead(nn.Module):
    """An extra head: a per-query score of the decoder's hidden states, (L, N, Q)."""

    def __init__(self, embed_dim):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 1)

    def forward(self, outputs):
        return {"area_score": self.linear(outputs.hidden_states).squeeze(-1)}


def _images(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=generator) for h, w in [(64, 96), (80, 70)]]


@pytest.fixture(name="model")
def model_fixture(tiny_dino_config):
    torch.manual_seed(0)
    model = instantiate(tiny_dino_config().model).eval()
    perturb_frozen_batchnorm(model)
    return model


def _scores(model, images):
    with torch.no_grad():
        return [out["instances"].scores for out in model([{"image": im} for im in images])]


def test_forward_hooks_on_linears_fire_on_the_fast_path(model):
    fast = copy.deepcopy(model)
    optimize_for_cpu_inference(fast)
    seen = {}
    for name in (
        "transformer.encoder.layers.0.ffn.linear2",
        "transformer.query_selection.enc_output",
    ):
        layer = fast.get_submodule(name)

        def hook(module, inputs, output, name=name):
            seen[name] = (inputs[0], output)

        layer.register_forward_hook(hook)
    _scores(fast, _images())
    assert set(seen) == {
        "transformer.encoder.layers.0.ffn.linear2",
        "transformer.query_selection.enc_output",
    }
    for name, (x, output) in seen.items():
        layer = model.get_submodule(name)
        torch.testing.assert_close(output, layer(x), rtol=1e-5, atol=1e-5)


def test_a_lora_linear_is_honoured_on_the_fast_path(model):
    name = "transformer.decoder.layers.0.ffn"
    ffn = model.get_submodule(name)
    adapted = copy.deepcopy(model)
    adapted.get_submodule(name).linear1 = LoRALinear(ffn.linear1)
    fast = copy.deepcopy(adapted)
    counts = optimize_for_cpu_inference(fast)
    lora = fast.get_submodule(name).linear1
    # The transform leaves a Linear subclass (and the ReLU after it) as they are.
    assert type(lora) is LoRALinear and type(fast.get_submodule(name).activation) is nn.ReLU
    assert counts["onednn_linears"] == sum(type(m) is nn.Linear for m in adapted.modules())
    images = _images()
    fast_scores, adapted_scores = _scores(fast, images), _scores(adapted, images)
    assert lora.calls == 1
    for ours, theirs, plain in zip(fast_scores, adapted_scores, _scores(model, images)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert (ours - plain).abs().max() > 1e-3  # the adapter changes the detections


def test_the_transformed_model_gives_the_plain_model_s_detections(model):
    """Scores within 1e-5 on a small random model. With random weights, encoder proposals
    whose scores tie to a rounding error can leave the query selection's top-k in either order
    (changing the detections of the queries involved): fast_path_parity then re-runs the plain
    model in the fast path's order (dino_d2.export.ties) and says so in its notes."""
    batch = [{"image": image.float()} for image in _images(3)]
    comparison = fast_path_parity(model, batch, score_tolerance=1e-5, box_tolerance=1e-3)
    assert comparison.passed, comparison.summary()
    assert comparison.num_paired == comparison.num_detections == 2 * model.num_select
    assert comparison.max_score_diff <= 1e-5


def test_an_extra_head_is_an_output_of_the_exported_graph(tiny_dino_config, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = tiny_dino_config()
    cfg.model.heads = L(OrderedDict)(area=L(BoxAreaHead)(embed_dim="${...transformer.embed_dim}"))
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    graph = InferenceGraph(model)
    sample = pad_images(_images(1))
    verification = [pad_images([_images(2)[1]])]
    result = export_model(
        graph, sample, "onnx", str(tmp_path), preprocessing={}, verification=verification
    )
    assert result.verification.passed, result.verification.summary()
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "scores", "classes", "area_score"]
    images, sizes = pad_images(_images(4))
    outputs = dict(
        zip(names, session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()}))
    )
    with torch.no_grad():
        eager = model.detect(images, sizes, exact_batched=False)
    np.testing.assert_allclose(outputs["scores"], eager.scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(outputs["area_score"], eager.extras["area_score"].numpy(), atol=1e-5)
    hidden_scores = eager.extras["area_score"]
    assert hidden_scores.shape == eager.scores.shape and hidden_scores.std() > 0
