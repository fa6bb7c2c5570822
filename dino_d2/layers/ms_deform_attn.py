"""Multi-scale deformable attention, the op (Deformable DETR, arXiv 2010.04159), and the choice of
its backend.

The op samples every head's value map at a few learned locations per feature level and returns
the attention-weighted sum. Three backends compute it:

* ``"compiled"``: the kernels of the ``dino_d2._C`` extension, the custom op
  ``torch.ops.dino_d2.ms_deform_attn_forward`` (with ``_backward``), for ``cpu`` tensors (float32 /
  float64, and bfloat16 values with float32 locations and weights, summed in float32) and ``cuda`` ones when it was compiled with the CUDA kernels. The op has fake (meta)
  kernels and an autograd formula registered here (``csrc/ops.cpp`` names this module), so
  ``torch.export`` keeps it as one node and an ExportedProgram or an AOTInductor package runs it
  with the compiled kernel.
* ``"grid_sample"`` and ``"gather"``: the pure-PyTorch references of
  :mod:`dino_d2.layers.ms_deform_attn_reference`, any dtype and device.

:func:`multi_scale_deformable_attn` picks the backend on every call:

1. inside ``with msda_backend(name)``, that backend (``"compiled"`` raises when it cannot handle
   the tensors);
2. otherwise (``"auto"``, the default) the backend named by ``DINO_D2_MSDA_BACKEND`` when it is
   set to one; else ``"grid_sample"`` while ``torch.onnx.export`` runs (the compiled op has no
   ONNX form); else ``"compiled"`` when it handles the tensors' device and dtype; else
   ``"grid_sample"``.

The choice is made in Python when the call is traced, so ``torch.export`` or ``torch.onnx.export``
inside ``with msda_backend("gather"):`` records the gather-based graph.

Conventions shared by every backend (batch first):

* ``value``: (N, S, M, D), S = sum over levels of H_l * W_l, M heads of D channels each.
* ``spatial_shapes``: (L, 2) int64, (H_l, W_l) of each level, on the device of ``value``.
* ``level_start_index``: (L,) int64, where level l starts in the S axis.
* ``level_shapes``: optional, the same (H_l, W_l) as a sequence of L pairs of Python ints or
  SymInts. The ``grid_sample`` backend needs the sizes on the host; given ``level_shapes`` it
  reads them from there instead of ``spatial_shapes.tolist()``, which under ``torch.export`` with
  dynamic sizes would bake the traced sizes in (or fail). It must describe the same levels as
  ``spatial_shapes``; this is not checked (that would cost a device sync on every call).
* ``sampling_locations``: (N, Q, M, L, P, 2), normalized (x, y) with (0, 0) the top-left corner of
  the map and (1, 1) its bottom-right corner; locations outside [0, 1] read zeros.
* ``attention_weights``: (N, Q, M, L, P).
* output: (N, Q, M * D).
"""

import contextlib
import functools
import importlib
import os
import sys
import warnings
from typing import ContextManager, Iterator, List, Optional, Union

import torch

from .ms_deform_attn_reference import (
    multi_scale_deformable_attn_gather,
    multi_scale_deformable_attn_pytorch,
)
from .multi_scale_levels import LevelShapes

__all__ = [
    "BACKEND_ENV_VAR",
    "MSDA_BACKENDS",
    "available_backends",
    "cuda_kernel_compiled",
    "load_extension",
    "msda_backend",
    "msda_implementation",
    "multi_scale_deformable_attn",
]

# Name of the environment variable that selects the backend outside any msda_backend() block.
BACKEND_ENV_VAR = "DINO_D2_MSDA_BACKEND"
# The values of msda_backend() and of DINO_D2_MSDA_BACKEND: "auto" picks per call (module doc).
MSDA_BACKENDS = ("auto", "compiled", "grid_sample", "gather")
# Old spellings still accepted for one release, with a DeprecationWarning naming the new one.
_DEPRECATED_BACKEND_NAMES = {"pytorch": "grid_sample"}
_FORWARD_OP = "dino_d2::ms_deform_attn_forward"
_BACKWARD_OP = "dino_d2::ms_deform_attn_backward"
# Dtypes of value the compiled kernels accept, per device type (the CPU kernel takes bfloat16
# values with float32 locations and weights: see _cpu_bfloat16_kernel).
_COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
# Set by msda_backend(). A plain module global (not thread-local): torch.compile guards on it,
# and export traces in the thread that entered the block.
_backend = "auto"
# Whether the fake kernels and the autograd formula are registered on the compiled op.
_op_registered = False


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shapes of ``ms_deform_attn_forward`` for tensors without data (FakeTensor / meta)."""
    torch._check(value.dim() == 4, lambda: f"value must be (N, S, M, D), got {value.shape}")
    torch._check(
        sampling_locations.dim() == 6 and attention_weights.dim() == 5,
        lambda: "sampling_locations must be (N, Q, M, L, P, 2) and attention_weights "
        f"(N, Q, M, L, P), got {sampling_locations.shape} and {attention_weights.shape}",
    )
    torch._check(
        spatial_shapes.dtype == torch.int64 and level_start_index.dtype == torch.int64,
        lambda: "spatial_shapes and level_start_index must be int64, got "
        f"{spatial_shapes.dtype} and {level_start_index.dtype}",
    )
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _backward_fake(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
):
    """Shapes of ``ms_deform_attn_backward``: gradients like value, locations and weights."""
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (value, sampling_locations, attention_weights)
    )


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _compiled_backward(ctx, grad_output):
    """First-order gradients of the compiled op w.r.t. value, locations and weights."""
    grad_value, grad_locations, grad_weights = torch.ops.dino_d2.ms_deform_attn_backward(
        *ctx.saved_tensors, grad_output
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the compiled multi-scale deformable attention has first-order gradients only; use "
        f"{BACKEND_ENV_VAR}=grid_sample (or msda_backend('grid_sample')) for higher orders"
    )


def _register_op() -> None:
    """Registers the fake kernels and the autograd formula of the compiled op (once).

    Called once ``dino_d2._C`` has defined the op; ``csrc/ops.cpp`` names this module with
    ``set_python_module``, which torch requires of Python registrations on a C++ op.
    """
    global _op_registered
    if _op_registered:
        return
    torch.library.register_fake(_FORWARD_OP, _forward_fake)
    torch.library.register_fake(_BACKWARD_OP, _backward_fake)
    torch.library.register_autograd(_FORWARD_OP, _compiled_backward, setup_context=_save_inputs)
    torch.library.register_autograd(_BACKWARD_OP, _no_double_backward)
    _op_registered = True


@functools.lru_cache(maxsize=None)
def _extension_loaded() -> bool:
    """Imports ``dino_d2._C`` once; warns once and returns False when it cannot be loaded."""
    try:
        # Importing the extension registers the torch.ops.dino_d2 operators.
        importlib.import_module("dino_d2._C")
    except (ImportError, OSError) as e:
        warnings.warn(
            f"dino_d2._C could not be loaded ({e}); multi-scale deformable attention falls back "
            "to the slower pure-PyTorch grid_sample backend. Build it with "
            "`python setup.py build_ext --inplace` or `pip install -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _register_op()
    return True


def load_extension() -> bool:
    """Loads the compiled kernels and registers their fake kernels and autograd formula.

    :func:`multi_scale_deformable_attn` does this on its first call. Call it first in a process
    that only runs or re-traces a saved ExportedProgram (``torch.export.load``) holding
    ``torch.ops.dino_d2.ms_deform_attn_forward`` (an AOTInductor package needs the op registered
    too: ``import dino_d2._C`` is enough there).

    Returns:
        Whether ``dino_d2._C`` is loaded (False, with one warning, when it cannot be).
    """
    return _extension_loaded()


def _compiled_registered(device_type: str) -> bool:
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not _extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, dispatch_key)


# torch.compile takes the answer as a constant instead of tracing the extension import.
@torch.compiler.assume_constant_result
def _compiled_handles(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a compiled kernel is registered for this device type and accepts this dtype."""
    return dtype in _COMPILED_DTYPES.get(device_type, ()) and _compiled_registered(device_type)


def cuda_kernel_compiled() -> bool:
    """Whether ``dino_d2._C`` was compiled with the CUDA kernels (False without the extension)."""
    return _extension_loaded() and bool(torch.ops.dino_d2.compiled_with_cuda())


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """The backends that can compute the op for tensors on ``device`` in this process.

    Args:
        device: a device or device type (``"cpu"``, ``"cuda"``, ...).

    Returns:
        A subset of ``["compiled", "grid_sample", "gather"]`` in that order: ``grid_sample`` and
        ``gather`` always; ``compiled`` when the compiled kernel of the device type is registered
        (and, for ``cuda``, a GPU is visible).
    """
    device_type = torch.device(device).type
    compiled = _compiled_registered(device_type)
    if device_type == "cuda":
        compiled = compiled and torch.cuda.is_available()
    return [name for name in MSDA_BACKENDS[1:] if compiled or name != "compiled"]


def _check_backend(name: str, where: str) -> str:
    """``name`` if it is one of :data:`MSDA_BACKENDS`, its new spelling (with a warning) if it is
    a deprecated one; raises a ValueError naming ``where`` otherwise."""
    name = name.strip().lower()
    if name in _DEPRECATED_BACKEND_NAMES:
        new = _DEPRECATED_BACKEND_NAMES[name]
        warnings.warn(
            f"{where}={name!r} is deprecated and will be removed; use {new!r}",
            DeprecationWarning,
            stacklevel=4,
        )
        return new
    if name not in MSDA_BACKENDS:
        raise ValueError(f"{where} takes one of {list(MSDA_BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def msda_backend(name: str) -> Iterator[None]:
    """Selects the backend of :func:`multi_scale_deformable_attn` inside the block.

    Typical use is an export::

        with msda_backend("gather"):
            torch.onnx.export(model, args, dynamo=True)  # no GridSample in the graph

    The setting is process-wide (not per thread), overrides ``DINO_D2_MSDA_BACKEND``, and blocks
    nest; leaving one restores the previous setting.

    Args:
        name: one of :data:`MSDA_BACKENDS`: ``"compiled"``, ``"grid_sample"``
            (:func:`multi_scale_deformable_attn_pytorch`), ``"gather"``
            (:func:`multi_scale_deformable_attn_gather`) or ``"auto"`` (the default choice, see
            the module docstring).

    Raises:
        ValueError: for any other name.
    """
    global _backend
    name = _check_backend(name, "msda_backend")
    previous = _backend
    _backend = name
    try:
        yield
    finally:
        _backend = previous


def msda_implementation(name: str) -> ContextManager[None]:
    """Deprecated spelling of :func:`msda_backend` (kept for one release)."""
    warnings.warn(
        "msda_implementation() is deprecated and will be removed; use msda_backend()",
        DeprecationWarning,
        stacklevel=2,
    )
    return msda_backend(name)


def _onnx_export_running() -> bool:
    # torch.onnx is not imported by `import torch`; when nobody imported it, no export runs.
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _backend_for(value: torch.Tensor) -> str:
    """The backend (not ``"auto"``) that computes the op for tensors like ``value``."""
    choice = _backend
    if choice == "auto":
        choice = _check_backend(os.environ.get(BACKEND_ENV_VAR, "auto") or "auto", BACKEND_ENV_VAR)
    if choice == "auto":
        if _onnx_export_running():
            return "grid_sample"
        return "compiled" if _compiled_handles(value.device.type, value.dtype) else "grid_sample"
    if choice == "compiled" and not _compiled_handles(value.device.type, value.dtype):
        raise RuntimeError(
            f"the compiled multi-scale deformable attention backend cannot run {value.dtype} "
            f"tensors on {value.device.type} here (backends available there: "
            f"{available_backends(value.device)})"
        )
    return choice


def _cpu_bfloat16_kernel(value: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the CPU kernel takes ``value`` in bfloat16 as it is, with the ``others``
    (locations, weights; float32 or bfloat16) in float32: bfloat16 values under CPU autocast,
    where the locations and the softmaxed weights come out in float32."""
    return (
        value.dtype == torch.bfloat16
        and value.device.type == "cpu"
        and all(t.dtype in (torch.float32, torch.bfloat16) for t in others)
        and _backend_for(value) == "compiled"
    )


def multi_scale_deformable_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    level_shapes: Optional[LevelShapes] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention, computed by the backend chosen for this call.

    See the module docstring for the choice: by default the compiled kernel of the tensors'
    device when the extension provides it for their dtype (CPU: float32, float64, bfloat16), otherwise
    :func:`multi_scale_deformable_attn_pytorch`. Inputs of different floating dtypes are promoted
    to a common one first, except bfloat16 values on the CPU: the kernel reads them as they are,
    with the locations and weights in float32, and returns bfloat16. Differentiable with respect
    to ``value``, ``sampling_locations`` and ``attention_weights`` (first order with the compiled
    backend).

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        level_start_index: (L,) int64 start of each level in the S axis.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.
        level_shapes: optional L pairs (H_l, W_l) of Python ints or SymInts, the same sizes as
            ``spatial_shapes``; pass them (e.g. from the feature maps' ``shape``) so that an
            export with dynamic image sizes does not bake the traced sizes in.

    Returns:
        (N, Q, M * D) attention output, in the promoted dtype (bfloat16 for the CPU kernel's
        bfloat16 values).
    """
    if _cpu_bfloat16_kernel(value, sampling_locations, attention_weights):
        return torch.ops.dino_d2.ms_deform_attn_forward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations.float(),
            attention_weights.float(),
        )
    dtype = torch.promote_types(
        value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    )
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    backend = _backend_for(value)
    if backend == "compiled":
        return torch.ops.dino_d2.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if backend == "gather":
        return multi_scale_deformable_attn_gather(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return multi_scale_deformable_attn_pytorch(
        value, spatial_shapes, sampling_locations, attention_weights, level_shapes=level_shapes
    )
