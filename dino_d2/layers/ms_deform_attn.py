"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159; used by DINO's encoder and
decoder).

The op samples every head's value map at a few learned locations per feature level and returns
the attention-weighted sum. Three implementations compute it:

* the compiled kernels of the ``dino_d2._C`` extension, the custom op
  ``torch.ops.dino_d2.ms_deform_attn_forward`` (with ``_backward``): ``cpu`` (float32 / float64,
  and bfloat16 values with float32 locations and weights, summed in float32) and ``cuda`` when it
  was compiled with the CUDA kernels. The op has fake (meta) kernels and an
  autograd formula registered here, so ``torch.export`` keeps it as one node and an
  ExportedProgram or an AOTInductor package runs it with the compiled kernel.
* ``grid_sample``: :func:`multi_scale_deformable_attn_pytorch`, built on ``F.grid_sample``; any
  dtype and device, always available, the reference for the others. Exported to ONNX, it becomes
  ``GridSample`` nodes (opset 16 or newer).
* ``gather``: :func:`multi_scale_deformable_attn_gather`, the same bilinear sampling written with
  index arithmetic and one ``Gather`` per corner, for runtimes that mishandle ``GridSample``.

:func:`multi_scale_deformable_attn` picks one on every call:

1. inside ``with msda_implementation("grid_sample")`` or ``("gather")``, that implementation;
2. otherwise (``"auto"``, the default) the reference when ``DINO_D2_MSDA_BACKEND=pytorch`` is set
   or while ``torch.onnx.export`` runs (the compiled op has no ONNX form), else the compiled kernel
   of the tensors' device and dtype when there is one, else the reference.

The choice is made in Python when the call is traced, so ``torch.export`` or ``torch.onnx.export``
inside ``with msda_implementation("gather"):`` records the gather-based graph.

Conventions shared by every function here (batch first):

* ``value``: (N, S, M, D), S = sum over levels of H_l * W_l, M heads of D channels each.
* ``spatial_shapes``: (L, 2) int64, (H_l, W_l) of each level, on the device of ``value``.
* ``level_start_index``: (L,) int64, where level l starts in the S axis.
* ``level_shapes``: optional, the same (H_l, W_l) as a sequence of L pairs of Python ints or
  SymInts. The ``grid_sample`` implementation needs the sizes on the host; given ``level_shapes``
  it reads them from there instead of ``spatial_shapes.tolist()``, which under ``torch.export``
  with dynamic sizes would bake the traced sizes in (or fail). It must describe the same levels as
  ``spatial_shapes``; this is not checked (that would cost a device sync on every call).
* ``sampling_locations``: (N, Q, M, L, P, 2), normalized (x, y) with (0, 0) the top-left corner of
  the map and (1, 1) its bottom-right corner; locations outside [0, 1] read zeros.
* ``attention_weights``: (N, Q, M, L, P).
* output: (N, Q, M * D).

Sampling is bilinear with zero padding, exactly ``F.grid_sample(align_corners=False,
padding_mode="zeros")``: location x samples pixel coordinate ``x * W_l - 0.5``.
"""

import contextlib
import functools
import importlib
import math
import os
import sys
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MSDA_IMPLEMENTATIONS",
    "MultiScaleDeformableAttention",
    "available_backends",
    "cuda_kernel_compiled",
    "level_index_tensors",
    "load_extension",
    "msda_implementation",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_gather",
    "multi_scale_deformable_attn_pytorch",
]

# Name of the environment variable that selects the backend ("auto" or "pytorch").
BACKEND_ENV_VAR = "DINO_D2_MSDA_BACKEND"
# Values of msda_implementation(): "auto" picks per call (see the module docstring).
MSDA_IMPLEMENTATIONS = ("auto", "grid_sample", "gather")
_FORWARD_OP = "dino_d2::ms_deform_attn_forward"
_BACKWARD_OP = "dino_d2::ms_deform_attn_backward"
# Dtypes of value the compiled kernels accept, per device type (the CPU kernel takes bfloat16
# values with float32 locations and weights: see _cpu_bfloat16_kernel).
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
# Set by msda_implementation(). A plain module global (not thread-local): torch.compile guards on
# it, and export traces in the thread that entered the block.
_implementation = "auto"
# Whether the fake kernels and the autograd formula are registered on the compiled op.
_op_registered = False

LevelShapes = Sequence[Tuple[int, int]]


def _host_level_shapes(
    spatial_shapes: torch.Tensor, level_shapes: Optional[LevelShapes]
) -> List[Tuple[int, int]]:
    """(H_l, W_l) of every level as Python ints or SymInts, from ``level_shapes`` when given."""
    if level_shapes is None:
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    shapes = [tuple(pair) for pair in level_shapes]
    if len(shapes) != spatial_shapes.shape[0] or any(len(pair) != 2 for pair in shapes):
        raise ValueError(
            f"level_shapes must hold {spatial_shapes.shape[0]} (H_l, W_l) pairs like "
            f"spatial_shapes, got {list(level_shapes)}"
        )
    return shapes


def level_index_tensors(
    level_shapes: LevelShapes, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes`` and ``level_start_index`` from L pairs (H_l, W_l).

    The pairs may be SymInts (e.g. ``feature.shape[-2:]`` while exporting with dynamic sizes):
    ``torch.tensor`` records them symbolically, while ``torch.as_tensor`` would specialize them to
    the traced sizes.

    Args:
        level_shapes: L pairs (H_l, W_l) of Python ints or SymInts.
        device: device of the returned tensors.

    Returns:
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64 start of each level in the flattened S axis.
    """
    spatial_shapes = torch.tensor(
        [[h, w] for h, w in level_shapes], dtype=torch.int64, device=device
    )
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return spatial_shapes, level_start_index


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    level_shapes: Optional[LevelShapes] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (the reference implementation).

    Bilinear sampling with zero padding, exactly ``F.grid_sample(align_corners=False,
    padding_mode="zeros")``. Works for any dtype and device and is differentiable with respect to
    every floating-point input.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level; sum of H_l * W_l must equal S.
            Only read (on the host) when ``level_shapes`` is None.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.
        level_shapes: optional L pairs (H_l, W_l) of Python ints or SymInts, the same sizes as
            ``spatial_shapes``; needed to export with dynamic sizes.

    Returns:
        (N, Q, M * D) attention output.
    """
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = _host_level_shapes(spatial_shapes, level_shapes)
    values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on (N * M, D, H, W) maps with a (N * M, Q, P, 2) grid in [-1, 1].
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)
    per_level = []
    for level, (h, w) in enumerate(shapes):
        value_l = values[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        per_level.append(
            F.grid_sample(
                value_l,
                grids[:, :, level],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )
    # (N * M, D, Q, L, P) times (N * M, 1, Q, L, P), summed over levels and points.
    sampled = torch.stack(per_level, dim=3)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels, p)
    output = (sampled * weights).sum(dim=(3, 4))
    return output.view(n, m * d, q).transpose(1, 2).contiguous()


def multi_scale_deformable_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with explicit bilinear interpolation and row gathers.

    The same result as :func:`multi_scale_deformable_attn_pytorch` (``F.grid_sample`` with
    ``align_corners=False, padding_mode="zeros"``) without ``grid_sample``: location ``(x, y)`` of
    level l reads pixel coordinate ``(x * W_l - 0.5, y * H_l - 0.5)``; each of its four corner
    pixels gets the bilinear weight, times zero when the corner lies outside the map. The corners
    are fetched as rows of ``value`` viewed as (N * S * M, D), one ``index_select`` (ONNX
    ``Gather``) per corner position over all levels at once. The level sizes are read from the
    ``spatial_shapes`` and ``level_start_index`` tensors inside the graph, so no size is needed on
    the host and an export with dynamic sizes stays dynamic. Works for any dtype and device and
    is differentiable with respect to every floating-point input.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        level_start_index: (L,) int64 start of each level in the S axis.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) locations in [0, 1].
        attention_weights: (N, Q, M, L, P) weight of every sampled point.

    Returns:
        (N, Q, M * D) attention output.
    """
    n, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    device = value.device
    level_view = (1, 1, 1, num_levels, 1)
    heights = spatial_shapes[:, 0].view(level_view)
    widths = spatial_shapes[:, 1].view(level_view)
    # Row of pixel (x, y) of level l for batch element b and head h in value viewed as
    # (N * S * M, D): (b * S + start_l + y * W_l + x) * M + h.
    row_base = (torch.arange(n, device=device) * s).view(n, 1, 1, 1, 1)
    row_base = row_base + level_start_index.view(level_view)
    heads = torch.arange(m, device=device).view(1, 1, m, 1, 1)
    rows_of_value = value.reshape(n * s * m, d)

    x = sampling_locations[..., 0] * widths.to(sampling_locations.dtype) - 0.5
    y = sampling_locations[..., 1] * heights.to(sampling_locations.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    output = value.new_zeros((n, q, m, d))
    for dy, weight_y in ((0, 1 - fy), (1, fy)):
        corner_y = y0 + dy
        inside_y = (corner_y >= 0) & (corner_y <= heights - 1)
        for dx, weight_x in ((0, 1 - fx), (1, fx)):
            corner_x = x0 + dx
            inside = inside_y & (corner_x >= 0) & (corner_x <= widths - 1)
            # Corners off the map read row 0 with weight 0 (NaN-safe: where, not a product).
            row_y = torch.where(inside, corner_y, 0).to(torch.int64) * widths
            row_x = torch.where(inside, corner_x, 0).to(torch.int64)
            rows = (row_base + row_y + row_x) * m + heads
            weight = torch.where(inside, weight_x * weight_y * attention_weights, 0)
            sampled = rows_of_value.index_select(0, rows.reshape(-1))
            sampled = sampled.view(n, q, m, num_levels * p, d)
            output = output + (sampled * weight.view(n, q, m, num_levels * p, 1)).sum(dim=3)
    return output.view(n, q, m * d)


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


def _kernel_backward(ctx, grad_output):
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
        f"{BACKEND_ENV_VAR}=pytorch (or msda_implementation('grid_sample')) for higher orders"
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
    torch.library.register_autograd(_FORWARD_OP, _kernel_backward, setup_context=_save_inputs)
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
            "to the slower pure-PyTorch implementation. Build it with "
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


def _kernel_registered(device_type: str) -> bool:
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not _extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, dispatch_key)


# torch.compile takes the answer as a constant instead of tracing the extension import.
@torch.compiler.assume_constant_result
def _kernel_handles(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a compiled kernel is registered for this device type and accepts this dtype."""
    return dtype in _KERNEL_DTYPES.get(device_type, ()) and _kernel_registered(device_type)


def cuda_kernel_compiled() -> bool:
    """Whether ``dino_d2._C`` was compiled with the CUDA kernels (False without the extension)."""
    return _extension_loaded() and bool(torch.ops.dino_d2.compiled_with_cuda())


def available_backends() -> List[str]:
    """Names of the backends usable in this process.

    Returns:
        A subset of ``["pytorch", "cpu", "cuda"]``: ``pytorch`` always, ``cpu`` when the compiled
        CPU kernel is registered, ``cuda`` when the CUDA kernel is registered and a GPU is visible.
    """
    backends = ["pytorch"]
    if _kernel_registered("cpu"):
        backends.append("cpu")
    if _kernel_registered("cuda") and torch.cuda.is_available():
        backends.append("cuda")
    return backends


@contextlib.contextmanager
def msda_implementation(name: str) -> Iterator[None]:
    """Selects the implementation of :func:`multi_scale_deformable_attn` inside the block.

    Typical use is an export::

        with msda_implementation("gather"):
            torch.onnx.export(model, args, dynamo=True)  # no GridSample in the graph

    The setting is process-wide (not per thread) and blocks nest; leaving one restores the
    previous setting.

    Args:
        name: ``"grid_sample"`` (:func:`multi_scale_deformable_attn_pytorch`), ``"gather"``
            (:func:`multi_scale_deformable_attn_gather`) or ``"auto"`` (the default choice: the
            compiled kernel when it handles the tensors, ``grid_sample`` otherwise, under
            ``DINO_D2_MSDA_BACKEND=pytorch`` and during ``torch.onnx.export``).

    Raises:
        ValueError: for any other name.
    """
    global _implementation
    if name not in MSDA_IMPLEMENTATIONS:
        raise ValueError(
            f"msda_implementation takes one of {list(MSDA_IMPLEMENTATIONS)}, got {name!r}"
        )
    previous = _implementation
    _implementation = name
    try:
        yield
    finally:
        _implementation = previous


def _onnx_export_running() -> bool:
    # torch.onnx is not imported by `import torch`; when nobody imported it, no export runs.
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _implementation_for(value: torch.Tensor) -> str:
    """``"kernel"``, ``"grid_sample"`` or ``"gather"`` for tensors like ``value`` (see module doc)."""
    if _implementation != "auto":
        return _implementation
    choice = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower()
    if choice == "pytorch":
        return "grid_sample"
    if choice not in ("", "auto"):
        raise ValueError(f"{BACKEND_ENV_VAR} must be 'auto' or 'pytorch', got {choice!r}")
    if _onnx_export_running():
        return "grid_sample"
    return "kernel" if _kernel_handles(value.device.type, value.dtype) else "grid_sample"


def _cpu_bfloat16_kernel(value: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the CPU kernel takes ``value`` in bfloat16 as it is, with the ``others``
    (locations, weights; float32 or bfloat16) in float32: bfloat16 values under CPU autocast,
    where the locations and the softmaxed weights come out in float32."""
    return (
        value.dtype == torch.bfloat16
        and value.device.type == "cpu"
        and all(t.dtype in (torch.float32, torch.bfloat16) for t in others)
        and _implementation_for(value) == "kernel"
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
    """Multi-scale deformable attention, computed by the implementation chosen for this call.

    See the module docstring for the choice: by default the compiled kernel of the tensors'
    device when the extension provides it for their dtype (CPU: float32 and float64), otherwise
    :func:`multi_scale_deformable_attn_pytorch`. Inputs of different floating dtypes are promoted
    to a common one first, except bfloat16 values on the CPU: the kernel reads them as they are,
    with the locations and weights in float32, and returns bfloat16. Differentiable with respect to ``value``, ``sampling_locations`` and
    ``attention_weights`` (first order with the kernel).

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
    implementation = _implementation_for(value)
    if implementation == "kernel":
        return torch.ops.dino_d2.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if implementation == "gather":
        return multi_scale_deformable_attn_gather(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return multi_scale_deformable_attn_pytorch(
        value, spatial_shapes, sampling_locations, attention_weights, level_shapes=level_shapes
    )


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections (Deformable DETR, Sec. 4.1).

    Every query predicts, for each of ``num_heads`` heads, ``num_points`` sampling offsets per
    level around its reference point and the softmax-normalized weights of those
    ``num_levels * num_points`` samples. The residual connection is left to the caller.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        """
        Args:
            embed_dim: channels C of queries, values and output; divisible by ``num_heads``.
            num_heads: attention heads M; each has C / M channels.
            num_levels: feature levels L.
            num_points: sampling points P per head and level.
            dropout: dropout probability applied to the output.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, samples * 2)
        self.attention_weights = nn.Linear(embed_dim, samples)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation.

        Offsets start at zero weight with a bias that places head h's points along the direction
        at angle 2 pi h / M (scaled so that the larger coordinate is 1), point k at k + 1 times
        that direction, the same on every level; attention weights start uniform.
        """
        m, l, p = self.num_heads, self.num_levels, self.num_points
        angles = torch.arange(m, dtype=torch.float64) * (2.0 * math.pi / m)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, p + 1, dtype=torch.float64).view(1, 1, p, 1)
        bias = directions.view(m, 1, 1, 2) * scale
        bias = bias.expand(m, l, p, 2)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        *,
        level_shapes: Optional[LevelShapes] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Q, C) queries, positional embedding already added.
            reference_points: (N, Q, L, 2) normalized (x, y) points in [0, 1], or (N, Q, L, 4)
                normalized (cx, cy, w, h) boxes. Offsets are divided by (W_l, H_l) for points and
                scaled by (w, h) * 0.5 / num_points for boxes.
            value: (N, S, C) flattened multi-scale features, S = sum over levels of H_l * W_l.
            spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
            level_start_index: (L,) int64 start of each level in the S axis.
            value_padding_mask: optional (N, S) bool, True at padded pixels; their values are
                zeroed so they never contribute.
            level_shapes: optional L pairs (H_l, W_l) of Python ints or SymInts equal to
                ``spatial_shapes``, for exports with dynamic sizes (see
                :func:`multi_scale_deformable_attn`).

        Returns:
            (N, Q, C) output of ``output_proj`` (no residual).
        """
        n, q, _ = query.shape
        s = value.shape[1]
        m, l, p = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape != (l, 2):
            raise ValueError(f"spatial_shapes must have shape ({l}, 2), got {spatial_shapes.shape}")
        if reference_points.shape[:3] != (n, q, l) or reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"reference_points must have shape ({n}, {q}, {l}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.embed_dim // m)

        weights = self.attention_weights(query)
        weights = weights.view(n, q, m, l * p).softmax(-1).view(n, q, m, l, p)

        if reference_points.shape[-1] == 2:
            # An offset of 1 moves by one pixel of its level: offsets are divided by that
            # level's (W_l, H_l) in the same pass that adds them to the reference points.
            per_level = (1.0 / spatial_shapes.flip(-1).to(query.dtype))[None, :, None, :]
            per_level = per_level.expand(m, l, p, 2).reshape(m, l * p * 2)
            offsets = self.sampling_offsets(query).view(n, q, m, l * p * 2)
            start = reference_points[:, :, None, :, None, :].expand(n, q, 1, l, p, 2)
            locations = torch.addcmul(start.reshape(n, q, 1, l * p * 2), offsets, per_level)
            locations = locations.view(n, q, m, l, p, 2)
        else:
            offsets = self.sampling_offsets(query)
            offsets = offsets.view(n, q, m, l, p, 2)
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / p * sizes * 0.5

        output = multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights, level_shapes=level_shapes
        )
        return self.dropout(self.output_proj(output))
