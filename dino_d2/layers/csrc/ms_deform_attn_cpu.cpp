// Multi-scale deformable attention on the CPU: float32 and float64, and bfloat16 values with
// float32 locations and weights, summed in float32 (the output and grad_value are rounded to
// bfloat16 once, when stored).
//
// Forward: every (n, q, m) writes its own output row out[n, q, m, :], so the flattened (n, q, m)
// range is split between threads with no synchronisation; it is walked in the memory order of
// the sampling locations, attention weights and output.
//
// Backward: head m of batch element n only reads value[n, :, m, :] and only writes
// grad_value[n, :, m, :], so (n, m) pairs are split between threads and the scatter into
// grad_value never races. grad_sampling_locations and grad_attention_weights are written once per
// sample (n, q, m, l, p) by the task that owns (n, m). When there are many samples per pixel
// (the encoder), value and grad_value are handled in a head-major (N, M, S, D) copy so that each
// task stays within one contiguous slab (see backward_head_major).
//
// The kernels themselves, free of torch types, are in ms_deform_attn_kernels.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernels.h"

namespace dino_d2 {
namespace {

using namespace kernels;

template <typename scalar_t, typename value_t>
void forward_kernel(const Problem<scalar_t, value_t>& pb, value_t* output) {
  const int64_t samples = std::max<int64_t>(1, pb.sz.levels * pb.sz.points);
  const int64_t blocks = pb.sz.batch * pb.sz.queries * pb.sz.heads;
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / samples), [&](int64_t b, int64_t e) {
#ifdef DINO_D2_AVX2_CLONE
    if (avx2) {
      forward_range_avx2(pb, output, b, e);
      return;
    }
#endif
    forward_range_baseline(pb, output, b, e);
  });
}

template <typename scalar_t, typename value_t>
void backward_kernel(const Problem<scalar_t, value_t>& pb, const Grads<scalar_t>& grads) {
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, pb.sz.batch * pb.sz.heads, 1, [&](int64_t b, int64_t e) {
#ifdef DINO_D2_AVX2_CLONE
    if (avx2) {
      backward_range_avx2(pb, grads, b, e);
      return;
    }
#endif
    backward_range_baseline(pb, grads, b, e);
  });
}

// The dtype of the locations, the weights, their gradients and every sum, for values of
// `dtype`: float32 for bfloat16 values (whose 8-bit mantissa cannot place a sample within a
// pixel of a wide map), else the values' own dtype.
at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// Runs `body` with scalar_t (the sums' type) and value_t (the values' type) set for `dtype`.
template <typename Body>
void dispatch_value_dtype(at::ScalarType dtype, Body&& body) {
  if (dtype == at::kBFloat16) {
    body(float{}, c10::BFloat16{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_attn_cpu", [&] { body(scalar_t{}, scalar_t{}); });
}

void check_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.device().is_cpu(), op, ": expected every tensor on the CPU, but ", name, " is on ",
      t.device());
}

// Validates the inputs shared by forward and backward; returns the levels and fills `sz`.
std::vector<Level> check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const char* op,
    Sizes& sz) {
  check_tensor(value, "value", op);
  check_tensor(spatial_shapes, "spatial_shapes", op);
  check_tensor(level_start_index, "level_start_index", op);
  check_tensor(sampling_locations, "sampling_locations", op);
  check_tensor(attention_weights, "attention_weights", op);

  TORCH_CHECK(
      value.dim() == 4, op, ": value must have shape (N, S, M, D), got ", value.sizes());
  const at::ScalarType dtype = value.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
      ": the CPU kernel supports float32, float64 and bfloat16 values, got value of dtype ",
      dtype);
  const at::ScalarType sum_dtype = accumulation_dtype(dtype);
  TORCH_CHECK(
      sampling_locations.scalar_type() == sum_dtype && attention_weights.scalar_type() == sum_dtype,
      op, ": sampling_locations and attention_weights must be ", sum_dtype, " with value of dtype ",
      dtype, " (float32 with bfloat16 values, else the value's dtype), got ",
      sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      op, ": spatial_shapes and level_start_index must be int64, got ",
      spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
      ": spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == num_levels, op,
      ": level_start_index must have shape (L,) = (", num_levels, "), got ",
      level_start_index.sizes());

  sz.batch = value.size(0);
  sz.pixels = value.size(1);
  sz.heads = value.size(2);
  sz.channels = value.size(3);
  sz.levels = num_levels;
  TORCH_CHECK(
      sampling_locations.dim() == 6, op,
      ": sampling_locations must have shape (N, Q, M, L, P, 2), got ", sampling_locations.sizes());
  sz.queries = sampling_locations.size(1);
  sz.points = sampling_locations.size(4);
  TORCH_CHECK(
      sampling_locations.size(0) == sz.batch && sampling_locations.size(2) == sz.heads &&
          sampling_locations.size(3) == sz.levels && sampling_locations.size(5) == 2,
      op, ": sampling_locations must have shape (N, Q, M, L, P, 2) with N = ", sz.batch,
      ", M = ", sz.heads, " (from value) and L = ", sz.levels, " (from spatial_shapes), got ",
      sampling_locations.sizes());
  const std::vector<int64_t> weights_shape = {
      sz.batch, sz.queries, sz.heads, sz.levels, sz.points};
  TORCH_CHECK(
      attention_weights.sizes() == at::IntArrayRef(weights_shape), op,
      ": attention_weights must have shape (N, Q, M, L, P) = ", at::IntArrayRef(weights_shape),
      ", got ", attention_weights.sizes());

  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* shape_data = shapes.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  std::vector<Level> levels(num_levels);
  int64_t total = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    const int64_t height = shape_data[2 * l];
    const int64_t width = shape_data[2 * l + 1];
    TORCH_CHECK(
        height >= 0 && width >= 0, op, ": spatial_shapes[", l, "] = (", height, ", ", width,
        ") must not be negative");
    TORCH_CHECK(
        start_data[l] == total, op, ": level_start_index[", l, "] must be ", total,
        " (the sum of H * W over the previous levels), got ", start_data[l]);
    levels[l] = Level{height, width, total};
    total += height * width;
  }
  TORCH_CHECK(
      total == sz.pixels, op, ": value has S = ", sz.pixels, " pixels but spatial_shapes sums to ",
      total);
  return levels;
}

// Memory layout of value for the kernels: (N, S, M, D) as given, or head-major (N, M, S, D).
Layout value_layout(const Sizes& sz, bool head_major) {
  if (head_major) {
    return Layout{sz.heads * sz.pixels * sz.channels, sz.pixels * sz.channels, sz.channels};
  }
  return Layout{sz.pixels * sz.heads * sz.channels, sz.channels, sz.heads * sz.channels};
}

// Whether the backward pass should work in the head-major layout. It costs three extra passes
// over (N, S, M, D) tensors (transposing value, zeroing and transposing back grad_value) and
// keeps each task's reads and writes within one contiguous slab; measured on the DINO shapes,
// it pays off once there are about as many samples per head as pixels (the encoder), not for
// the few hundred queries of the decoder. The forward pass, which only reads value, gains
// nothing measurable from it and always uses the layout it is given.
bool backward_head_major(const Sizes& sz) {
  return sz.heads > 1 && sz.queries * sz.levels * sz.points >= sz.pixels;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  Sizes sz;
  const std::vector<Level> levels = check_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      "ms_deform_attn_forward_cpu", sz);
  at::Tensor output = at::empty({sz.batch, sz.queries, sz.heads * sz.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor values = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  dispatch_value_dtype(value.scalar_type(), [&](auto sum, auto val) {
    using scalar_t = decltype(sum);
    using value_t = decltype(val);
    const std::vector<value_t> zeros(sz.channels, value_t(0));
    const Problem<scalar_t, value_t> pb{
        values.data_ptr<value_t>(),
        value_layout(sz, false),
        levels.data(),
        loc.data_ptr<scalar_t>(),
        attn.data_ptr<scalar_t>(),
        zeros.data(),
        sz};
    forward_kernel(pb, output.data_ptr<value_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  constexpr const char* op = "ms_deform_attn_backward_cpu";
  Sizes sz;
  const std::vector<Level> levels = check_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op, sz);
  check_tensor(grad_output, "grad_output", op);
  TORCH_CHECK(
      grad_output.scalar_type() == value.scalar_type(), op,
      ": grad_output must have the dtype of value (", value.scalar_type(), "), got ",
      grad_output.scalar_type());
  const std::vector<int64_t> output_shape = {sz.batch, sz.queries, sz.heads * sz.channels};
  TORCH_CHECK(
      grad_output.sizes() == at::IntArrayRef(output_shape), op,
      ": grad_output must have shape (N, Q, M * D) = ", at::IntArrayRef(output_shape), ", got ",
      grad_output.sizes());

  // With the head-major layout grad_value is accumulated as (N, M, S, D), then transposed back.
  // Gradients are summed in the accumulation dtype (float32 for bfloat16 values); grad_value is
  // rounded to the value's dtype once, at the end.
  const bool head_major = backward_head_major(sz);
  const auto sums = value.options().dtype(accumulation_dtype(value.scalar_type()));
  at::Tensor grad_value = head_major
      ? at::zeros({sz.batch, sz.heads, sz.pixels, sz.channels}, sums)
      : at::zeros(value.sizes(), sums);
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), sums);
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), sums);
  if (grad_attn.numel() > 0) {
    const at::Tensor values =
        head_major ? value.permute({0, 2, 1, 3}).contiguous() : value.contiguous();
    const at::Tensor loc = sampling_locations.contiguous();
    const at::Tensor attn = attention_weights.contiguous();
    const at::Tensor grad_out = grad_output.contiguous().to(sums.dtype());
    dispatch_value_dtype(value.scalar_type(), [&](auto sum, auto val) {
      using scalar_t = decltype(sum);
      using value_t = decltype(val);
      const Problem<scalar_t, value_t> pb{
          values.data_ptr<value_t>(),
          value_layout(sz, head_major),
          levels.data(),
          loc.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(),
          nullptr,
          sz};
      const Grads<scalar_t> grads{
          grad_out.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>()};
      backward_kernel(pb, grads);
    });
  }
  if (head_major) {
    grad_value = grad_value.permute({0, 2, 1, 3});
  }
  return {grad_value.to(value.scalar_type()).contiguous(), grad_loc, grad_attn};
}

}  // namespace dino_d2
