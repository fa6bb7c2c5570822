"""int8 post-training quantization of an ONNX export for OpenVINO (NNCF), with parts kept in float.

:func:`quantize_int8` reads ``model.onnx`` into OpenVINO and quantizes it with NNCF's
``nncf.quantize`` (``ModelType.TRANSFORMER``: no quantizers on the softmax / layer-norm paths
that transformers are known to lose accuracy on), calibrated on images the caller gives
(:func:`calibration_inputs`: training images through the config's test-time mapper).

DETR-family decoders lose most of their accuracy in int8 (RT-DETR-L in OpenVINO: mAP 0.0002
with the decoder quantized, 0.65 with it kept in float, ultralytics PR #26191): the decoder's
box refinement adds each layer's predicted offset to the last layer's boxes, so quantization
errors accumulate across layers, and the top-k query selection turns small score errors into
other queries. The parts of :data:`FLOAT_PARTS` can be kept in float (NNCF's ignored scope);
each is found from the module path the ONNX exporter writes on every node
(``pkg.torch.onnx.name_scopes``), so the choice follows the model's own module names.

:func:`accept_int8` is the rule a tool applies before it writes the int8 model: its AP must be
within ``max_drop`` of the float32 export's, measured on the same images.
"""

import ast
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from .evaluate import pad_batch

__all__ = [
    "DEFAULT_FLOAT_PARTS",
    "FLOAT_PARTS",
    "Int8Decision",
    "accept_int8",
    "calibration_inputs",
    "float_node_names",
    "module_scope",
    "openvino_bf16_supported",
    "quantize_int8",
    "save_openvino",
]

# Parts that can stay in float: a regular expression on the innermost module path of a node,
# and why the part is kept.
FLOAT_PARTS: Dict[str, tuple] = {
    "decoder": (
        r"(^|\.)transformer\.decoder(\.|$)",
        "the decoder layers and their box / class heads: each layer refines the previous "
        "layer's boxes, so int8 errors accumulate across layers",
    ),
    "query_selection": (
        r"(^|\.)transformer\.query_selection(\.|$)",
        "the encoder's proposal heads: their scores choose the top-k queries, and small errors "
        "choose other queries",
    ),
    "sampling": (
        r"\.self_attn\.(sampling_offsets|attention_weights)$",
        "the encoder's deformable-attention sampling offsets and weights: an offset error moves "
        "the sampled point, at the finest level by whole pixels",
    ),
}
DEFAULT_FLOAT_PARTS = tuple(FLOAT_PARTS)


def module_scope(node: Any) -> str:
    """The innermost module path of an ONNX node written by ``torch.onnx.export(dynamo=True)``
    (e.g. ``"model.transformer.decoder.layers.0.self_attn"``); ``""`` for nodes outside any
    module (shape arithmetic of the graph's own forward)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [scope for scope in ast.literal_eval(prop.value)[:-1] if scope]
            return scopes[-1] if scopes else ""
    return ""


def float_node_names(onnx_model: Any, parts: Iterable[str]) -> List[str]:
    """The names of the ONNX nodes inside ``parts`` (keys of :data:`FLOAT_PARTS`).

    Args:
        onnx_model: an ``onnx.ModelProto`` exported by dino_d2 (its nodes carry module paths).
        parts: the parts to keep in float.

    Raises:
        ValueError: an unknown part, or a part that matches no node (the graph carries no module
            paths, or the model has no such module).
    """
    parts = list(parts)
    unknown = [part for part in parts if part not in FLOAT_PARTS]
    if unknown:
        raise ValueError(f"unknown float part(s) {unknown}; expected some of {list(FLOAT_PARTS)}")
    names = []
    for part in parts:
        pattern = re.compile(FLOAT_PARTS[part][0])
        found = [node.name for node in onnx_model.graph.node if pattern.search(module_scope(node))]
        if not found:
            raise ValueError(
                f"float part {part!r} matches no node of the ONNX graph (pattern "
                f"{FLOAT_PARTS[part][0]!r} on the nodes' pkg.torch.onnx.name_scopes)"
            )
        names.extend(found)
    return names


def calibration_inputs(
    cfg, num_images: int, dtype: torch.dtype, min_size: int, dataset: Optional[str] = None
) -> List[Dict[str, Any]]:
    """Calibration inputs of the exported graph: training images through the test-time mapper.

    Args:
        cfg: a LazyConfig with ``dataloader.test`` (its mapper resizes as the export expects)
            and ``dataloader.train.dataset.names``.
        num_images: how many images, the first of the dataset in its order.
        dtype: the dtype of the graph's image input.
        min_size: the smallest padded height and width the graph accepts.
        dataset: the dataset name(s) to read; default the config's training datasets.

    Returns:
        ``num_images`` feeds ``{"images": (1, 3, H, W), "image_sizes": (1, 2) int64}`` (numpy).

    Raises:
        ValueError: ``num_images`` < 1 or more than the dataset holds.
    """
    import copy

    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    from dino_d2.data import register_builtin_datasets

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    cfg = copy.deepcopy(cfg)
    names = dataset or OmegaConf.select(cfg, "dataloader.train.dataset.names")
    register_builtin_datasets([names] if isinstance(names, str) else list(names))
    cfg.dataloader.test.dataset.names = names
    feeds = []
    for batch in instantiate(cfg.dataloader.test):
        for item in batch:
            images, sizes = pad_batch([item["image"]], dtype, min_size)
            feeds.append({"images": images.numpy(), "image_sizes": sizes.numpy()})
            if len(feeds) == num_images:
                return feeds
    raise ValueError(f"{names} holds {len(feeds)} images, fewer than the {num_images} asked")


def quantize_int8(
    onnx_path: str,
    calibration: Sequence[Dict[str, Any]],
    float_parts: Iterable[str] = DEFAULT_FLOAT_PARTS,
) -> Any:
    """The ONNX export quantized to int8 for OpenVINO by NNCF, ``float_parts`` left in float.

    Args:
        onnx_path: ``model.onnx`` written by :func:`dino_d2.export.exporter.export_model`.
        calibration: the feeds to calibrate on (:func:`calibration_inputs`); all are used.
        float_parts: keys of :data:`FLOAT_PARTS` to keep in float; empty: the whole model.

    Returns:
        the quantized ``openvino.Model`` (save it with ``openvino.save_model``); its inputs and
        outputs are the export's.
    """
    try:
        import nncf
        import onnx
        import openvino
    except ImportError as e:
        raise ImportError(f"int8 quantization needs `pip install -e .[openvino]` ({e})") from e
    model = openvino.Core().read_model(onnx_path)
    present = {op.get_friendly_name() for op in model.get_ops()}
    names = float_node_names(onnx.load(onnx_path, load_external_data=False), float_parts)
    # Nodes OpenVINO folded away (constants, identities) have nothing to quantize.
    ignored = nncf.IgnoredScope(names=sorted(set(names) & present), validate=False)
    return nncf.quantize(
        model,
        nncf.Dataset(list(calibration)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        ignored_scope=ignored,
    )


def save_openvino(model: Any, path: str) -> None:
    """Writes an ``openvino.Model`` to ``path`` (``.xml``, with the weights in ``.bin`` beside)."""
    import openvino

    openvino.save_model(model, path)


def openvino_bf16_supported() -> bool:
    """Whether OpenVINO computes in bfloat16 on this CPU (AVX512-BF16 or AMX)."""
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in [str(c).upper() for c in capabilities]


@dataclass
class Int8Decision:
    """Whether the int8 model is accurate enough to be written, and the sentence that says so."""

    accepted: bool
    message: str


def accept_int8(float_ap: float, int8_ap: float, max_drop: float = 1.0) -> Int8Decision:
    """The int8 model is accepted when its AP is at most ``max_drop`` below the float32
    export's (both measured on the same images, AP in percent); a NaN AP is refused."""
    drop = float_ap - int8_ap
    accepted = drop <= max_drop
    verdict = "within" if accepted else "more than"
    return Int8Decision(
        accepted,
        f"box AP float32 {float_ap:.2f}, int8 {int8_ap:.2f}: drop {drop:.2f}, {verdict} "
        f"{max_drop:.2f}",
    )
