import importlib.util
import os
import pickle

import pytest
import torch

from dino_d2.model_zoo import get_config

# Tests run on shared CPU cores; one thread per process avoids oversubscription and keeps
# kernel timings out of the picture (tests check invariants, not speed).
torch.set_num_threads(1)


def tiny_dino_config(*, decoder_layers=1, num_queries=10, num_select=10, test_size=(64, 96)):
    """dino_r50_4scale_12ep shrunk through ordinary config edits: ResNet-18, width 64, 4 heads,
    one encoder layer, small FFNs and test images of ``test_size`` (shortest, longest side)."""
    cfg = get_config("dino_r50_4scale_12ep.py")
    cfg.model.backbone.bottom_up.stages.depth = 18
    del cfg.model.backbone.bottom_up.stages.stride_in_1x1  # basic blocks have no 1x1 conv
    cfg.model.backbone.num_groups = 8
    t = cfg.model.transformer
    t.embed_dim = 64
    t.position_embedding.num_pos_feats = 32
    t.encoder.num_layers, t.decoder.num_layers = 1, decoder_layers
    t.encoder.layer.ffn_dim = t.decoder.layer.ffn_dim = 128
    t.encoder.layer.num_heads = t.decoder.layer.num_heads = 4
    t.query_selection.num_queries = num_queries
    cfg.model.denoising.dn_number = 4
    cfg.model.num_select = num_select
    cfg.dataloader.test.mapper.augmentations.min_size = test_size[0]
    cfg.dataloader.test.mapper.augmentations.max_size = test_size[1]
    cfg.train.device = "cpu"
    return cfg


@pytest.fixture(name="tiny_dino_config", scope="session")
def tiny_dino_config_fixture():
    """The :func:`tiny_dino_config` factory, for tests in any folder."""
    return tiny_dino_config


class _CreatesMarker:
    """Unpickling this object opens ``marker`` for writing: the file appears if loading ran the
    code a pickle carries (``open`` stands for any function, e.g. ``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_payload(path, marker, weights=None, zip_format=True):
    """Writes a checkpoint at ``path`` whose unpickling would create ``marker``: a ``torch.save``
    file (``zip_format=False``: torch's pre-1.6 format), or for ``.pkl`` Detectron2's model-zoo
    pickle (numpy arrays); ``weights`` (name -> tensor, default none) go under ``"model"``.

    Returns:
        the global the payload names (``io.open``), which a refusal must report.
    """
    weights = dict(weights or {})
    path = str(path)
    if path.endswith(".pkl"):
        data = {
            "model": {name: value.numpy() for name, value in weights.items()},
            "__author__": "payload",
            "matching_heuristics": False,
            "extra": _CreatesMarker(marker),
        }
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        data = {"model": weights, "extra": _CreatesMarker(marker)}
        torch.save(data, path, _use_new_zipfile_serialization=zip_format)
    return f"{open.__module__}.{open.__qualname__}"


@pytest.fixture(name="write_payload", scope="session")
def write_payload_fixture():
    """The :func:`write_payload` writer, for tests in any folder."""
    return write_payload


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """A script of tools/ as a module (``tools/deploy/onnx_predict.py``: "deploy/onnx_predict"),
    loaded anew on each call."""
    path = os.path.join(_REPO, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tool_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="load_tool", scope="session")
def load_tool_fixture():
    """The :func:`load_tool` loader, for tests in any folder."""
    return load_tool
