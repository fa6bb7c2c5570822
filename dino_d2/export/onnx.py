"""ONNX export with dino_d2's deformable attention written as standard ONNX operators.

The compiled op ``torch.ops.dino_d2.ms_deform_attn_forward`` has no ONNX form, so
:func:`export_onnx` runs ``torch.onnx.export(..., dynamo=True)`` inside
:func:`~dino_d2.layers.ms_deform_attn.msda_backend` and the attention is traced as one of
its pure-PyTorch backends:

* ``"grid_sample"`` (the default): ``GridSample`` nodes (ONNX opset 16 or newer; dino_d2 asks
  for 17 or newer);
* ``"gather"``: ``Floor`` / ``Where`` / ``Gather`` arithmetic and no ``GridSample`` at all, for
  runtimes that mishandle ``GridSample`` (TensorRT has compiled grid_sample-based deformable
  attention into silently wrong detections);
* ``"node"``: one ``dino_d2::MultiScaleDeformableAttention`` node per attention (the compiled
  op, translated as it is), which onnxruntime and OpenVINO run with dino_d2's libraries and its
  CPU kernel (:mod:`dino_d2.export.msda_node`; ``"openvino"`` is this backend's former name). On
  the DINO-R50 encoder's shapes the kernel takes about a fifth of the ``GridSample`` graph's
  time; other runtimes do not know the node.

The first two give the kernel's results up to float rounding; the third is the kernel. The traced
graph is then optimized by onnxscript (the exporter's ``optimize=True``): constants folded (shape
arithmetic, the position embeddings' frequency tables), redundant casts and reshapes removed, and
every batch norm that follows a convolution folded into its weights and bias, so runtimes get
about a third of the nodes the translation writes (3,900 against 1,400 for the digits model) and
no ``BatchNormalization``. The written graph is then checked: every node must be a standard ONNX
operator (or, with ``"node"``, dino_d2's), and with ``"gather"`` none may be ``GridSample``.

The dynamo-based exporter (torch.export, then onnxscript's translation) is used rather than the
TorchScript one: it keeps dynamic sizes symbolic (``dynamic_shapes``), which the level sizes of
deformable attention need, and it is the exporter torch develops. It needs ``onnx`` and
``onnxscript`` (``pip install dino_d2[export]``); :func:`run_onnxruntime` needs ``onnxruntime``.
"""

import importlib
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from dino_d2.layers import ms_deform_attn

from . import msda_node

__all__ = [
    "MIN_OPSET",
    "MSDA_ONNX_BACKENDS",
    "MSDA_ONNX_BACKEND_NAMES",
    "canonical_msda_backend",
    "check_onnx_graph",
    "export_onnx",
    "onnxruntime_session",
    "run_onnxruntime",
]

# Backends of deformable attention that ONNX can hold (see the module docstring), and the former
# name of one, still accepted.
MSDA_ONNX_BACKENDS = ("grid_sample", "gather", "node")
_FORMER_NAMES = {"openvino": "node"}
# Every name canonical_msda_backend accepts (a command line's choices).
MSDA_ONNX_BACKEND_NAMES = MSDA_ONNX_BACKENDS + tuple(_FORMER_NAMES)
# Oldest opset accepted: GridSample exists from 16; 17 is the oldest dino_d2 tests.
MIN_OPSET = 17
# Domains of the standard ONNX operators.
_STANDARD_DOMAINS = ("", "ai.onnx")


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs {module!r} ({e}); install the export extra: "
            "pip install -e '.[export]' (onnx, onnxruntime, onnxscript)"
        ) from e


def canonical_msda_backend(name: str) -> str:
    """``name`` as one of :data:`MSDA_ONNX_BACKENDS`: ``"openvino"``, the node backend's name
    when only OpenVINO could run it, becomes ``"node"``.

    Raises:
        ValueError: ``name`` is no backend.
    """
    name = _FORMER_NAMES.get(name, name)
    if name not in MSDA_ONNX_BACKENDS:
        raise ValueError(
            f"msda_backend must be one of {list(MSDA_ONNX_BACKENDS)} (or the former "
            f"{list(_FORMER_NAMES)}), got {name!r}"
        )
    return name


def check_onnx_graph(model_proto: Any, msda_backend: str) -> None:
    """Checks that an exported graph only holds standard ONNX operators.

    Args:
        model_proto: an ``onnx.ModelProto``.
        msda_backend: the backend it was exported with; with ``"gather"`` a ``GridSample``
            node is an error too, and only ``"node"`` allows dino_d2's own node.

    Raises:
        ValueError: naming the offending operators (and their node names).
    """
    nodes = list(model_proto.graph.node)
    for function in model_proto.functions:
        nodes.extend(function.node)
    problems = []
    msda_backend = canonical_msda_backend(msda_backend)
    allowed = set(_STANDARD_DOMAINS)
    if msda_backend == "node":
        allowed.add(msda_node.DOMAIN)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in allowed})
    if custom:
        problems.append(f"non-standard operators {custom}")
    if msda_backend == "gather":
        grid_samples = [n.name for n in nodes if n.op_type == "GridSample"]
        if grid_samples:
            problems.append(
                f"GridSample nodes {grid_samples[:5]} although msda_backend='gather' (does the "
                "model call F.grid_sample outside dino_d2's deformable attention?)"
            )
    if problems:
        raise ValueError("the exported ONNX graph has " + " and ".join(problems))


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    f: Optional[str] = None,
    *,
    msda_backend: str = "grid_sample",
    opset_version: Optional[int] = None,
    dynamic_shapes: Optional[Union[Dict[str, Any], Sequence[Any]]] = None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
) -> Any:
    """Exports ``model`` to ONNX with deformable attention decomposed by ``msda_backend``.

    Args:
        model: the module to export, in eval mode.
        args: example positional inputs.
        f: path of the ``.onnx`` file to write (weights inside it, or beside it as external data
            above 2 GB), or None to only return the program.
        msda_backend: ``"grid_sample"``, ``"gather"`` or ``"node"`` (see the module docstring).
        opset_version: ONNX opset, at least :data:`MIN_OPSET`; None takes torch's default.
        dynamic_shapes: as for ``torch.export.export``, e.g. ``{"image": {0: Dim("N"), 2: ...}}``.
        input_names, output_names: names of the graph's inputs and outputs.

    Returns:
        The ``torch.onnx.ONNXProgram`` (its ``model_proto`` is the ``onnx.ModelProto``).

    Raises:
        ValueError: for an unknown ``msda_backend``, an opset below :data:`MIN_OPSET`, or a graph that
            fails :func:`check_onnx_graph`.
        ImportError: when onnx or onnxscript is missing.
    """
    msda_backend = canonical_msda_backend(msda_backend)
    if opset_version is not None and opset_version < MIN_OPSET:
        raise ValueError(f"opset_version must be at least {MIN_OPSET}, got {opset_version}")
    _require("onnx")
    _require("onnxscript")
    translations = None
    if msda_backend == "node":
        translation = _node_translation()  # loads dino_d2._C, which defines the op
        translations = {torch.ops.dino_d2.ms_deform_attn_forward.default: translation}
    traced_backend = "compiled" if msda_backend == "node" else msda_backend
    with ms_deform_attn.msda_backend(traced_backend):
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset_version,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            optimize=True,
            custom_translation_table=translations,
        )
    check_onnx_graph(program.model_proto, msda_backend)
    if f is not None:
        program.save(f)
    return program


def _node_translation() -> Any:
    """The ONNX form of ``torch.ops.dino_d2.ms_deform_attn_forward``: dino_d2's own node, with the
    op's five inputs, for onnxruntime and OpenVINO with dino_d2's libraries."""
    import onnxscript

    if not ms_deform_attn.load_extension():
        raise RuntimeError(
            "msda_backend='node' traces the compiled deformable attention, and dino_d2._C "
            "could not be loaded"
        )
    onnx = _require("onnx")
    domain, op_type = msda_node.DOMAIN, msda_node.OP_TYPE
    # onnxscript writes a node from its operator's schema: the op's inputs, registered once.
    if not onnx.defs.has(op_type, domain):
        parameter = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                op_type,
                domain,
                1,
                doc="dino_d2's multi-scale deformable attention (dino_d2.layers.ms_deform_attn)",
                inputs=[
                    parameter("value", "T"),
                    parameter("spatial_shapes", "tensor(int64)"),
                    parameter("level_start_index", "tensor(int64)"),
                    parameter("sampling_locations", "T"),
                    parameter("attention_weights", "T"),
                ],
                outputs=[parameter("output", "T")],
                type_constraints=[("T", ["tensor(float)"], "float32 tensors")],
            )
        )
    opset = onnxscript.values.Opset(domain, 1)
    node = getattr(opset, op_type)

    def ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        return node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    return ms_deform_attn_forward


def onnxruntime_session(model: Any) -> Any:
    """An onnxruntime session on the CPU set up for latency.

    All graph optimizations (``ORT_ENABLE_ALL``: constant folding, node fusions, the blocked
    NCHWc layout for convolutions), one inference at a time (sequential execution) on as many
    threads as torch computes with (``torch.get_num_threads()``, so that an export and the
    eager model it is compared with get the same cores), and memory patterns reused between
    runs of the same input sizes. dino_d2's custom op library, which runs dino_d2's node, is
    registered (:func:`dino_d2.export.msda_node.add_to_onnxruntime`).

    Args:
        model: a path to an ``.onnx`` file or an ``onnx.ModelProto``.

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        ImportError: the graph holds dino_d2's node and the library is missing.
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    # Registered whenever it was built (a graph without the node does not use it), so that the
    # graph is only read here when the library is missing and the error must say so.
    if msda_node.onnxruntime_library() is not None or msda_node.has_node(model):
        msda_node.add_to_onnxruntime(options)
    if not isinstance(model, str):
        model = model.SerializeToString()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_mem_pattern = True
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def selection_probe(path: str) -> Optional[Any]:
    """The export at ``path`` in onnxruntime, giving the token indices that its query selection
    kept instead of detections, or None when the graph has no top-k.

    The selection is the graph's first ``TopK`` (inference's top-k over queries x classes comes
    after it); its indices become an extra output of an in-memory copy of the graph, so that a
    verification can see the order in which the export ranked tied proposals
    (:mod:`dino_d2.export.ties`).

    Returns:
        ``probe(images, image_sizes) -> (N, k) int64`` token indices, or None.
    """
    onnx = _require("onnx")
    model = onnx.load(path)
    topk = next((node for node in model.graph.node if node.op_type == "TopK"), None)
    if topk is None:
        return None
    indices = topk.output[1]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(indices, onnx.TensorProto.INT64, None)
    )
    session = onnxruntime_session(model)

    def probe(images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        feed = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
        return torch.from_numpy(session.run([indices], feed)[0])

    return probe


def run_onnxruntime(
    model: Any, inputs: Sequence[Union[torch.Tensor, np.ndarray]]
) -> List[np.ndarray]:
    """Runs an ONNX model on the CPU with onnxruntime (a session of :func:`onnxruntime_session`).

    Args:
        model: a path to an ``.onnx`` file or an ``onnx.ModelProto``.
        inputs: one array per graph input, in the graph's order.

    Returns:
        The graph's outputs, in order, as numpy arrays.
    """
    session = onnxruntime_session(model)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {names}, got {len(inputs)}")
    feed = {
        name: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        for name, x in zip(names, inputs)
    }
    return session.run(None, feed)
