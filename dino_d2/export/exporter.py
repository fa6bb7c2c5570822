"""Export a DINO to ONNX, an ExportedProgram (``.pt2``) or an AOTInductor package, and prove it.

:func:`export_model` writes the model and the pre-processing JSON a runtime needs beside it,
then loads what it wrote and runs it next to the PyTorch model on new images (other sizes than
the one traced, a size that is not a multiple of 32, an extreme aspect ratio, one image and a
batch of three of different real sizes) and reports the differences (:mod:`.verify`).

* ``onnx``: ``torch.onnx.export(dynamo=True)``; deformable attention decomposed into
  ``GridSample`` (``msda_backend="grid_sample"``) or gathers (``"gather"``), run with onnxruntime;
  or kept as dino_d2's own node (``"node"``), run with onnxruntime (or OpenVINO) and dino_d2's
  library.
* ``pt2``: ``torch.export`` with dino_d2's compiled deformable attention kept as one op; saved
  with ``torch.export.save``, run with ``torch.export.load(...).module()`` (after
  ``dino_d2.layers.ms_deform_attn.load_extension()``).
* ``aoti``: the same program compiled ahead of time by AOTInductor into a ``.pt2`` package, run
  with ``torch._inductor.aoti_load_package`` (the compiled op must be loaded in that process).

Batch size, height and width are dynamic in every format; the padded height and width must be
larger than the coarsest stride (at least 65 for DINO's stride-64 level, so that every level has
two rows and columns): a smaller batch is padded up by the runtime (the JSON gives
``min_input_size``).
"""

import json
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dino_d2.layers.ms_deform_attn import load_extension

from . import msda_node
from .graph import InferenceGraph
from .onnx import canonical_msda_backend, export_onnx, onnxruntime_session, selection_probe
from .ties import (
    ForcedTokensError,
    forced_tokens,
    recorded_selections,
    selection_near_ties,
    selection_tie_places,
)
from .verify import (
    DetectionComparison,
    compare_detections,
    detections_of_outputs,
    eager_detections,
    verification_batches,
)

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "dynamic_shapes",
    "export_model",
    "export_selection_probe",
    "load_exported",
    "load_onnxruntime",
    "load_openvino",
    "output_paths",
    "program_selection_probe",
]

FORMATS = ("onnx", "pt2", "aoti")
INPUT_NAMES = ("images", "image_sizes")
_EXTENSIONS = {"onnx": "model.onnx", "pt2": "model.pt2", "aoti": "model_aoti.pt2"}


class ExportError(Exception):
    """An export that cannot be made or cannot be trusted; the message says why."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    path: str
    preprocessing_path: str
    verification: DetectionComparison
    seconds: Dict[str, float] = field(default_factory=dict)


def output_paths(output_dir: str, fmt: str) -> Tuple[str, str]:
    """``(model file, pre-processing JSON)`` of a format in ``output_dir``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    model = os.path.join(output_dir, _EXTENSIONS[fmt])
    return model, os.path.splitext(model)[0] + ".json"


def min_input_size(graph: InferenceGraph) -> int:
    """The smallest padded height and width the exported graph accepts."""
    return max(graph.model.strides) + 1


def dynamic_shapes(graph: InferenceGraph) -> Dict[str, Dict[int, Any]]:
    """Dynamic batch, height and width of the graph's inputs, for ``torch.export``."""
    size = min_input_size(graph)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=size, max=16384)
    width = torch.export.Dim("width", min=size, max=16384)
    return {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}}


def _module_names(model: nn.Module) -> Dict[int, str]:
    return {id(module): name or "model" for name, module in model.named_modules()}


def failing_module(error: BaseException, model: nn.Module) -> Optional[str]:
    """The innermost module of ``model`` on the stack where ``error`` (or its causes) arose."""
    names = _module_names(model)
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and id(module) in names:
                found = f"{names[id(module)]} ({type(module).__name__})"
        if found:
            return found
        error = error.__cause__ or error.__context__
    return None


def _root_reason(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _export(graph: InferenceGraph, sample, fmt: str, path: str, msda_backend: str, opset: int):
    shapes = dynamic_shapes(graph)
    if fmt == "onnx":
        export_onnx(
            graph,
            sample,
            path,
            msda_backend=msda_backend,
            opset_version=opset,
            dynamic_shapes=shapes,
            input_names=list(INPUT_NAMES),
            output_names=graph.output_names(*sample),
        )
        return
    load_extension()
    program = torch.export.export(graph, sample, dynamic_shapes=shapes, strict=False)
    if fmt == "pt2":
        torch.export.save(program, path)
    else:
        torch._inductor.aoti_compile_and_package(program, package_path=path)


def load_exported(path: str, fmt: str) -> Callable[[Tensor, Tensor], Sequence]:
    """A callable ``(images, image_sizes) -> (boxes, scores, classes)`` running the export: an
    ONNX file in onnxruntime, with dino_d2's custom op library when it holds dino_d2's node (in
    OpenVINO, float32, when only OpenVINO's library was built)."""
    if fmt == "onnx" and not _runs_in_onnxruntime(path, fmt):
        return load_openvino(path)
    if fmt == "onnx":
        return load_onnxruntime(path)
    load_extension()
    if fmt == "pt2":
        module = torch.export.load(path).module()
    else:
        module = torch._inductor.aoti_load_package(path)

    def run_torch(images: Tensor, image_sizes: Tensor):
        with torch.no_grad():
            return module(images, image_sizes)

    return run_torch


class _SelectionReached(Exception):
    """Ends a probing run of an ExportedProgram at its query selection."""

    def __init__(self, indices: Tensor):
        super().__init__("the query selection was reached")
        self.indices = indices


def program_selection_probe(path: str) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The ExportedProgram (``.pt2``) at ``path`` run up to its query selection, giving the token
    indices that it kept, or None when the program has no top-k.

    The pt2 counterpart of :func:`dino_d2.export.onnx.selection_probe`: the selection is the
    program's first ``aten.topk`` (inference's top-k over queries x classes comes after it),
    and the program is interpreted node by node up to it (``torch.fx.Interpreter``), so the
    decoder does not run.

    Returns:
        ``probe(images, image_sizes) -> (N, k) int64`` token indices, or None.
    """
    load_extension()
    module = torch.export.load(path).module()
    topk = next(
        (
            node
            for node in module.graph.nodes
            if node.op == "call_function" and node.target is torch.ops.aten.topk.default
        ),
        None,
    )
    if topk is None:
        return None

    class UpToSelection(torch.fx.Interpreter):
        extra_traceback = False  # an exception passes through unchanged

        def run_node(self, node):
            result = super().run_node(node)
            if node is topk:
                raise _SelectionReached(result[1])
            return result

    def probe(images: Tensor, image_sizes: Tensor) -> Tensor:
        with torch.no_grad():
            try:
                UpToSelection(module).run(images, image_sizes)
            except _SelectionReached as reached:
                return reached.indices
        raise RuntimeError(f"{path}: the program ran to its end without reaching its top-k")

    return probe


def export_selection_probe(path: str, fmt: str) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The probe of the export's query selection (token indices in its order) for an ONNX file
    run in onnxruntime or an ExportedProgram; None for a compiled AOTInductor package (or an ONNX
    file run in OpenVINO), whose intermediate results cannot be read, and for an export without a
    top-k."""
    if fmt == "pt2":
        return program_selection_probe(path)
    if _runs_in_onnxruntime(path, fmt):
        return selection_probe(path)
    return None


def load_onnxruntime(path: str) -> Callable[[Tensor, Tensor], Sequence]:
    """A callable ``(images, image_sizes) -> (boxes, scores, classes)`` running an ONNX export in
    onnxruntime (:func:`~dino_d2.export.onnx.onnxruntime_session`)."""
    session = onnxruntime_session(path)

    def run_onnx(images: Tensor, image_sizes: Tensor):
        feed = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

    return run_onnx


def load_openvino(path: str, precision: str = "f32") -> Callable[[Tensor, Tensor], Sequence]:
    """A callable ``(images, image_sizes) -> (boxes, scores, classes)`` running an ONNX export
    in OpenVINO on the CPU (OpenVINO is not a dependency of dino_d2: ``pip install openvino``).
    dino_d2's extension, which runs the node of ``msda_backend="node"`` exports, is added first.

    Args:
        path: the ``model.onnx`` file.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``. ``"f32"`` by default: on CPUs with
            bfloat16 instructions (AVX512-BF16, AMX) OpenVINO otherwise computes in bfloat16,
            whose scores differ from float32 by about 1e-2 and whose top-k classes can change.
    """
    try:
        import openvino
    except ImportError as e:
        raise ImportError("running an ONNX export in OpenVINO needs `pip install openvino`") from e
    core = openvino.Core()
    # Added whenever it was built (a graph without the node does not use it): the graph is only
    # read when the library is missing, to say so.
    if msda_node.openvino_library() is not None or msda_node.has_node(path):
        msda_node.add_to_openvino(core)
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        # One inference at a time, as fast as it can go, on the threads torch computes with.
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
    }
    compiled = core.compile_model(core.read_model(path), "CPU", config)

    def run_openvino(images: Tensor, image_sizes: Tensor):
        outputs = compiled({"images": images.numpy(), "image_sizes": image_sizes.numpy()})
        return [torch.from_numpy(np.asarray(outputs[o])) for o in compiled.outputs]

    return run_openvino


def verification_sizes(short: int, long: int, minimum: int) -> List[List[Tuple[int, int]]]:
    """Image sizes of the verification batches for a model resized to ``short`` x ``long``.

    Three single images of other sizes than the traced one (one of them not a multiple of 32 on
    either side, one of an extreme aspect ratio) and a batch of three of different real sizes.
    """

    def clamp(h: int, w: int) -> Tuple[int, int]:
        return max(h, minimum), max(w, minimum)

    return [
        [clamp(short - 13, long - 29)],
        [clamp(short * 3 // 4 + 5, short + 11)],
        [clamp(max(short // 3, minimum) + 7, long)],
        [clamp(short - 13, long - 29), clamp(short * 3 // 4 + 5, short + 11), clamp(short, short)],
    ]


def export_model(
    graph: InferenceGraph,
    sample: Tuple[Tensor, Tensor],
    fmt: str,
    output_dir: str,
    *,
    preprocessing: Dict[str, Any],
    verification: Sequence[Tuple[Tensor, Tensor]],
    msda_backend: str = "grid_sample",
    opset: int = 18,
    overwrite: bool = False,
    score_tolerance: float = 1e-4,
    box_tolerance: float = 1e-2,
) -> ExportResult:
    """Exports ``graph``, writes its pre-processing JSON and verifies the export.

    Args:
        graph: the :class:`InferenceGraph` of the model.
        sample: ``(images, image_sizes)`` to trace with: at least two images (a batch of one
            would fix the batch size).
        fmt: one of :data:`FORMATS`.
        output_dir: the folder; the file names come from :func:`output_paths`.
        preprocessing: the runtime's pre-processing (written to the JSON, see the CLI).
        verification: ``(images, image_sizes)`` batches to compare on.
        msda_backend: the ONNX decomposition of deformable attention (``onnx`` only).
        opset: ONNX opset (``onnx`` only).
        overwrite: replace existing files; otherwise an existing output is an error.
        score_tolerance, box_tolerance: the largest differences accepted (scores; box
            coordinates in pixels).

    Raises:
        ExportError: an existing output without ``overwrite``, a model that cannot be exported
            (naming the module and the reason), or a verification that fails.
    """
    import time

    msda_backend = canonical_msda_backend(msda_backend)
    path, json_path = output_paths(output_dir, fmt)
    existing = [p for p in (path, json_path) if os.path.exists(p)]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} exist(s); use --overwrite to replace")
    if sample[0].shape[0] < 2:
        raise ExportError("the sample batch needs at least two images (one fixes the batch size)")
    for name, module in graph.model.named_modules():
        limitation = getattr(module, "export_limitation", None)
        if limitation:
            raise ExportError(
                f"cannot export to {fmt}: module {name} ({type(module).__name__}) {limitation}"
            )
    os.makedirs(output_dir, exist_ok=True)
    seconds = {}
    start = time.perf_counter()
    with torch.no_grad():
        try:
            _export(graph, sample, fmt, path, msda_backend, opset)
        except Exception as e:  # torch.export and the ONNX exporter raise many kinds
            where = failing_module(e, graph.model)
            raise ExportError(
                f"cannot export to {fmt}: "
                + (f"module {where} failed: " if where else "")
                + _root_reason(e)
            ) from e
    seconds["export"] = time.perf_counter() - start
    with open(json_path, "w") as f:
        json.dump({**preprocessing, "format": fmt, "model": os.path.basename(path)}, f, indent=2)

    start = time.perf_counter()
    run = load_exported(path, fmt)
    exported = [detections_of_outputs(run(*batch), batch[1]) for batch in verification]
    references, selections = _eager_references(graph.model, verification)
    tolerances = {"score_tolerance": score_tolerance, "box_tolerance": box_tolerance}
    comparison = compare_detections(_labelled(verification, references, exported), **tolerances)
    probe = export_selection_probe(path, fmt) if not comparison.passed and selections else None
    if probe is not None:
        # Tied proposals that the export ranked otherwise or kept at the cut: eager again with its
        # selection.
        reordered = _in_export_selection_order(
            graph.model, probe, verification, references, selections, score_tolerance
        )
        if reordered is not None:
            references, places = reordered
            comparison = compare_detections(
                _labelled(verification, references, exported), **tolerances
            )
            comparison.notes.append(
                f"at {places} places of the encoder's query selection the export kept another "
                "proposal that ties in score (another order, or another proposal tied at the "
                "k-th score); the eager model was re-run with the export's selection"
            )
    if not comparison.passed and selections:
        comparison.notes.extend(_selection_ties_note(selections[0], score_tolerance))
    seconds["verify"] = time.perf_counter() - start
    return ExportResult(path, json_path, comparison, seconds)


def _labelled(verification, references, exported):
    """``(reference, candidate, label)`` per image of the verification batches."""
    pairs = []
    for (_, image_sizes), reference, candidate in zip(verification, references, exported):
        label = "batch of " + ", ".join(f"{h}x{w}" for h, w in image_sizes.tolist())
        pairs.extend(
            (ref, out, f"{label}, image {i}")
            for i, (ref, out) in enumerate(zip(reference, candidate))
        )
    return pairs


def _runs_in_onnxruntime(path: str, fmt: str) -> bool:
    """Whether :func:`load_exported` runs the export in onnxruntime: an ONNX file, unless it holds
    dino_d2's node and only OpenVINO's library for it was built."""
    only_openvino = (
        msda_node.onnxruntime_library() is None and msda_node.openvino_library() is not None
    )
    return fmt == "onnx" and not (only_openvino and msda_node.has_node(path))


def _eager_references(model: nn.Module, verification):
    """The eager detections of each verification batch and, for a model with a query selection
    (``model.transformer.query_selection``), what it selected for each batch (else None)."""
    if getattr(getattr(model, "transformer", None), "query_selection", None) is None:
        return [eager_detections(model, *batch) for batch in verification], None
    references, selections = [], []
    for batch in verification:
        with recorded_selections(model) as recorded:
            references.append(eager_detections(model, *batch))
        selections.append(recorded[0])
    return references, selections


def _in_export_selection_order(
    model: nn.Module, probe, verification, references, selections, tolerance: float
):
    """The eager detections of the verification batches with the export's query selection
    (read by ``probe``, see :func:`export_selection_probe`), and at how many places it holds
    other tokens; None when no batch changed.

    ``selections`` are what the eager run of ``references`` selected, a
    :class:`~dino_d2.modeling.transformer.query_selection.SelectedQueries` per batch. A batch
    whose export selected the same tokens in the same order, or that differs at a place that
    is not a tie in the eager scores (:func:`~dino_d2.export.ties.selection_tie_places`), keeps
    its detections of ``references``; the others are eager run with the export's tokens
    (:func:`~dino_d2.export.ties.forced_tokens`): tied proposals in another order, or another
    of the proposals tied at the k-th score.
    """
    if not callable(getattr(model.transformer.query_selection, "rank", None)):
        return None
    reordered, changed = [], 0
    for (images, image_sizes), reference, ours in zip(verification, references, selections):
        theirs = probe(images, image_sizes)
        if theirs.shape != ours.indices.shape or torch.equal(theirs, ours.indices):
            reordered.append(reference)
            continue
        try:
            with forced_tokens(model, theirs) as scored:
                detections = eager_detections(model, images, image_sizes)
        except ForcedTokensError:  # tokens that the eager run does not have: not a tie
            reordered.append(reference)
            continue
        places = selection_tie_places(
            ours.enc_logits.amax(-1),
            scored[0],
            ours.indices,
            theirs,
            tolerance,
        )
        if places is None:
            reordered.append(reference)
            continue
        reordered.append(detections)
        changed += places
    return (reordered, changed) if changed else None


def _selection_ties_note(selection, tolerance: float) -> List[str]:
    """A note for a failed verification when the eager model's query selection of the first
    batch (a :class:`~dino_d2.export.ties.SelectedQueries`) holds near-tied proposals (see
    :func:`~dino_d2.export.ties.selection_near_ties`)."""
    ties = selection_near_ties([selection], tolerance)
    if not ties:
        return []
    total = selection.enc_logits.shape[0] * selection.enc_logits.shape[1]
    return [
        f"{ties} of the {total} proposals that the encoder selected for the first batch score "
        f"within {tolerance:g} of the next one (weights random or barely trained?): another "
        "runtime may rank them in another order, and the detections of their queries change "
        "with it. Verify the export of a trained checkpoint"
    ]


def random_verification(
    graph: InferenceGraph, short: int, long: int, seed: int = 1
) -> List[Tuple[Tensor, Tensor]]:
    """The verification batches of :func:`verification_sizes`, with random images."""
    generator = torch.Generator().manual_seed(seed)

    def make_image(height: int, width: int) -> Tensor:
        image = torch.randint(0, 256, (3, height, width), generator=generator)
        return image.to(graph.dtype)

    return verification_batches(make_image, verification_sizes(short, long, min_input_size(graph)))
