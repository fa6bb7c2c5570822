// CUDA kernels of multi-scale deformable attention (see ms_deform_attn.h for shapes and the
// sampling convention).
//
// Thread mapping: one thread per output element (n, q, m, d), i.e. per flat index of the
// (N, Q, M, D) view of the output. The D threads of one (n, q, m) are consecutive, so the value
// reads of one sampling point are coalesced and its location and weight are broadcast loads.
//
// Forward: each thread sums attention_weight * bilinear(value) over levels and points.
//
// Backward: each thread scatters its value gradient into the four corners with atomicAdd and
// computes its channel's share of the location and weight gradients; those shares are summed over
// the D channels by a segmented warp reduction (a group of D threads may start and end anywhere
// in a warp), and the first lane of each segment adds the sum with atomicAdd. Every gradient is
// accumulated in float (double for double inputs) and cast to the input dtype at the end.
//
// Indices are 64-bit throughout, so tensors larger than 2^31 elements are safe.
//
// Only c10's CUDA headers are used, not ATen/cuda/CUDAContext.h: that one includes the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a minimal CUDA toolkit does not ship.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ms_deform_attn.h"

namespace dino_d2 {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The backward kernel iterates warp by warp, so a block must hold whole warps.
constexpr int kThreads = 256;
static_assert(kThreads % kWarpSize == 0, "a block must hold whole warps");

struct Geometry {
  int64_t S;  // rows of value: sum over levels of H_l * W_l
  int64_t Q;  // queries
  int64_t M;  // heads
  int64_t D;  // channels per head
  int64_t L;  // levels
  int64_t P;  // points per head and level
};

__device__ __forceinline__ float floor_acc(float x) {
  return floorf(x);
}

__device__ __forceinline__ double floor_acc(double x) {
  return floor(x);
}

// The four bilinear neighbours of pixel position (h, w) on an H x W map whose pixel (y, x) sits
// at element offset (y * W + x) * row_stride. Corners are ordered (y0, x0), (y0, x0 + 1),
// (y0 + 1, x0), (y0 + 1, x0 + 1); a corner outside the map gets offset -1. On return ly and lx
// are the fractional parts of h and w, so the corner weights are
// (1 - ly)(1 - lx), (1 - ly) lx, ly (1 - lx) and ly lx.
// The caller guarantees -1 <= h < H and -1 <= w < W, the positions with a corner on the map.
template <typename acc_t>
__device__ __forceinline__ void bilinear_corners(
    acc_t h,
    acc_t w,
    int64_t H,
    int64_t W,
    int64_t row_stride,
    int64_t offset[4],
    acc_t& ly,
    acc_t& lx) {
  const acc_t h_floor = floor_acc(h);
  const acc_t w_floor = floor_acc(w);
  ly = h - h_floor;
  lx = w - w_floor;
  const int64_t y0 = static_cast<int64_t>(h_floor);
  const int64_t x0 = static_cast<int64_t>(w_floor);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t y = y0 + (k >> 1);
    const int64_t x = x0 + (k & 1);
    const bool inside = y >= 0 && y < H && x >= 0 && x < W;
    offset[k] = inside ? (y * W + x) * row_stride : -1;
  }
}

// True when a sampling point at pixel position (h, w) touches the map; false for NaN as well.
template <typename acc_t>
__device__ __forceinline__ bool touches_map(acc_t h, acc_t w, int64_t H, int64_t W) {
  return h >= acc_t(-1) && h < static_cast<acc_t>(H) && w >= acc_t(-1) &&
      w < static_cast<acc_t>(W);
}

// Reads (H, W, start) of level l and checks that the level lies inside value's S axis; without
// the check inconsistent spatial_shapes would read and write out of bounds. Checking on the host
// would need a device-to-host copy on every call.
__device__ __forceinline__ void read_level(
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    int64_t l,
    int64_t S,
    int64_t& H,
    int64_t& W,
    int64_t& start) {
  H = spatial_shapes[2 * l];
  W = spatial_shapes[2 * l + 1];
  start = level_start_index[l];
  CUDA_KERNEL_ASSERT_MSG(
      H >= 0 && W >= 0 && start >= 0 && start + H * W <= S,
      "ms_deform_attn: spatial_shapes and level_start_index do not fit value's S axis");
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_forward_kernel(
    int64_t total,
    Geometry g,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    scalar_t* __restrict__ output) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t row_stride = g.M * g.D;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += grid_stride) {
    const int64_t nqm = idx / g.D;
    const int64_t d = idx - nqm * g.D;
    const int64_t m = nqm % g.M;
    const int64_t n = nqm / (g.Q * g.M);
    // value[n, 0, m, d]; row s of the map is s * row_stride further on.
    const scalar_t* value_nmd = value + n * g.S * row_stride + m * g.D + d;
    const scalar_t* loc = sampling_locations + nqm * g.L * g.P * 2;
    const scalar_t* attn = attention_weights + nqm * g.L * g.P;

    acc_t sum = 0;
    for (int64_t l = 0; l < g.L; ++l) {
      int64_t H, W, start;
      read_level(spatial_shapes, level_start_index, l, g.S, H, W, start);
      const scalar_t* value_level = value_nmd + start * row_stride;
      for (int64_t p = 0; p < g.P; ++p, loc += 2, ++attn) {
        const acc_t h = static_cast<acc_t>(loc[1]) * static_cast<acc_t>(H) - acc_t(0.5);
        const acc_t w = static_cast<acc_t>(loc[0]) * static_cast<acc_t>(W) - acc_t(0.5);
        if (!touches_map(h, w, H, W)) {
          continue;
        }
        int64_t offset[4];
        acc_t ly, lx;
        bilinear_corners(h, w, H, W, row_stride, offset, ly, lx);
        const acc_t weight[4] = {
            (1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx};
        acc_t sample = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (offset[k] >= 0) {
            sample += weight[k] * static_cast<acc_t>(value_level[offset[k]]);
          }
        }
        sum += static_cast<acc_t>(*attn) * sample;
      }
    }
    output[idx] = static_cast<scalar_t>(sum);
  }
}

// Sums x over the lanes [lane, lane + reach] of the warp, for every lane at once. Each segment of
// lanes that share a group must be contiguous and reach must not cross its end (nor the warp's);
// the first lane of a segment then holds the segment's sum. No segment is longer than group_size.
// Every lane of the warp must call, with the same group_size.
template <typename acc_t>
__device__ __forceinline__ void segmented_warp_sum(
    acc_t& x0, acc_t& x1, acc_t& x2, int reach, int64_t group_size) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize && offset < group_size; offset <<= 1) {
    const acc_t y0 = __shfl_down_sync(kFullMask, x0, offset);
    const acc_t y1 = __shfl_down_sync(kFullMask, x1, offset);
    const acc_t y2 = __shfl_down_sync(kFullMask, x2, offset);
    if (offset <= reach) {
      x0 += y0;
      x1 += y1;
      x2 += y2;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_backward_kernel(
    int64_t total,
    Geometry g,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    acc_t* __restrict__ grad_value,
    acc_t* __restrict__ grad_sampling_locations,
    acc_t* __restrict__ grad_attention_weights) {
  const int64_t row_stride = g.M * g.D;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % kWarpSize;
  // The loop runs warp by warp (every lane sees the same warp_begin), so all 32 lanes stay in the
  // loop together and may shuffle; lanes past the end only take part in the shuffles.
  for (int64_t warp_begin = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane;
       warp_begin < total;
       warp_begin += grid_stride) {
    const bool active = warp_begin + lane < total;
    const int64_t idx = active ? warp_begin + lane : total - 1;
    const int64_t nqm = idx / g.D;
    const int64_t d = idx - nqm * g.D;
    const int64_t m = nqm % g.M;
    const int64_t n = nqm / (g.Q * g.M);
    const int64_t value_base = n * g.S * row_stride + m * g.D + d;
    const int64_t point_base = nqm * g.L * g.P;
    // This lane's reduction segment goes on for `reach` more lanes: up to the last channel of its
    // (n, q, m) or the warp's last lane, whichever comes first.
    const int64_t to_group_end = g.D - 1 - d;
    const int to_warp_end = kWarpSize - 1 - lane;
    const int reach =
        !active ? 0 : (to_group_end < to_warp_end ? static_cast<int>(to_group_end) : to_warp_end);
    const bool segment_head = active && (lane == 0 || d == 0);
    const acc_t grad_out = active ? static_cast<acc_t>(grad_output[idx]) : acc_t(0);

    for (int64_t l = 0; l < g.L; ++l) {
      int64_t H, W, start;
      read_level(spatial_shapes, level_start_index, l, g.S, H, W, start);
      const scalar_t* value_level = value + value_base + start * row_stride;
      acc_t* grad_value_level = grad_value + value_base + start * row_stride;
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t point = point_base + l * g.P + p;
        const acc_t loc_x = static_cast<acc_t>(sampling_locations[2 * point]);
        const acc_t loc_y = static_cast<acc_t>(sampling_locations[2 * point + 1]);
        const acc_t attn = static_cast<acc_t>(attention_weights[point]);
        const acc_t h = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
        const acc_t w = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
        // Uniform over the channels of one (n, q, m), hence over each reduction segment.
        const bool in_range = active && touches_map(h, w, H, W);

        acc_t grad_attn = 0;
        acc_t grad_x = 0;
        acc_t grad_y = 0;
        if (in_range) {
          int64_t offset[4];
          acc_t ly, lx;
          bilinear_corners(h, w, H, W, row_stride, offset, ly, lx);
          const acc_t hy = 1 - ly;
          const acc_t hx = 1 - lx;
          const acc_t weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
          const acc_t grad_sample = grad_out * attn;
          acc_t v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            v[k] = 0;
            if (offset[k] >= 0) {
              v[k] = static_cast<acc_t>(value_level[offset[k]]);
              atomicAdd(grad_value_level + offset[k], grad_sample * weight[k]);
            }
          }
          const acc_t sample = weight[0] * v[0] + weight[1] * v[1] + weight[2] * v[2] +
              weight[3] * v[3];
          grad_attn = grad_out * sample;
          // d sample / d w = (1 - ly)(v1 - v0) + ly (v3 - v2), and d w / d loc_x = W.
          grad_x =
              grad_sample * static_cast<acc_t>(W) * (hy * (v[1] - v[0]) + ly * (v[3] - v[2]));
          // d sample / d h = (1 - lx)(v2 - v0) + lx (v3 - v1), and d h / d loc_y = H.
          grad_y =
              grad_sample * static_cast<acc_t>(H) * (hx * (v[2] - v[0]) + lx * (v[3] - v[1]));
        }
        // Warp-uniform branch: skips the reduction when no lane samples inside its map.
        if (__any_sync(kFullMask, in_range)) {
          segmented_warp_sum(grad_attn, grad_x, grad_y, reach, g.D);
          if (segment_head && in_range) {
            atomicAdd(grad_attention_weights + point, grad_attn);
            atomicAdd(grad_sampling_locations + 2 * point, grad_x);
            atomicAdd(grad_sampling_locations + 2 * point + 1, grad_y);
          }
        }
      }
    }
  }
}

// Enough blocks to fill every multiprocessor of the current device a few times over; the
// grid-stride loops cover the rest.
unsigned int num_blocks(int64_t total) {
  int device = 0;
  int multiprocessors = 0;
  int threads_per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &threads_per_multiprocessor, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t resident = static_cast<int64_t>(std::max(multiprocessors, 1)) *
      std::max(threads_per_multiprocessor / kThreads, 1);
  const int64_t needed = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min(needed, 4 * resident));
}

void check_same_device(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(
      t.device() == value.device(),
      op, ": ", name, " is on ", t.device(), " but value is on ", value.device(),
      "; all inputs must be on the same CUDA device");
}

void check_same_dtype(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(
      t.scalar_type() == value.scalar_type(),
      op, ": ", name, " has dtype ", t.scalar_type(), " but value has dtype ",
      value.scalar_type(), "; they must match");
}

// Checks devices, dtypes and shapes and returns the sizes.
Geometry check_inputs(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), op, ": value must be a CUDA tensor, got one on ", value.device());
  check_same_device(op, "spatial_shapes", spatial_shapes, value);
  check_same_device(op, "level_start_index", level_start_index, value);
  check_same_device(op, "sampling_locations", sampling_locations, value);
  check_same_device(op, "attention_weights", attention_weights, value);

  TORCH_CHECK(
      value.dim() == 4, op, ": value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      op, ": spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong,
      op, ": spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(
      level_start_index.scalar_type() == at::kLong,
      op, ": level_start_index must be int64, got ", level_start_index.scalar_type());

  Geometry g;
  const int64_t N = value.size(0);
  g.S = value.size(1);
  g.M = value.size(2);
  g.D = value.size(3);
  g.L = spatial_shapes.size(0);
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == g.L,
      op, ": level_start_index must be (L,) with L = ", g.L, ", got shape ",
      level_start_index.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
          sampling_locations.size(2) == g.M && sampling_locations.size(3) == g.L &&
          sampling_locations.size(5) == 2,
      op, ": sampling_locations must be (N, Q, M, L, P, 2) with N = ", N, ", M = ", g.M,
      ", L = ", g.L, ", got shape ", sampling_locations.sizes());
  g.Q = sampling_locations.size(1);
  g.P = sampling_locations.size(4);
  TORCH_CHECK(
      attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
      op, ": attention_weights must be (N, Q, M, L, P) = ",
      sampling_locations.sizes().slice(0, 5), ", got shape ", attention_weights.sizes());
  check_same_dtype(op, "sampling_locations", sampling_locations, value);
  check_same_dtype(op, "attention_weights", attention_weights, value);
  return g;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "ms_deform_attn_forward_cuda";
  const Geometry g = check_inputs(
      op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());

  const int64_t N = value.size(0);
  at::Tensor output = at::empty({N, g.Q, g.M * g.D}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        ms_deform_attn_forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
            total,
            g,
            value_c.const_data_ptr<scalar_t>(),
            shapes_c.const_data_ptr<int64_t>(),
            starts_c.const_data_ptr<int64_t>(),
            loc_c.const_data_ptr<scalar_t>(),
            attn_c.const_data_ptr<scalar_t>(),
            output.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  constexpr const char* op = "ms_deform_attn_backward_cuda";
  const Geometry g = check_inputs(
      op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_same_device(op, "grad_output", grad_output, value);
  check_same_dtype(op, "grad_output", grad_output, value);
  const int64_t N = value.size(0);
  TORCH_CHECK(
      grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == g.Q &&
          grad_output.size(2) == g.M * g.D,
      op, ": grad_output must be (N, Q, M * D) = (", N, ", ", g.Q, ", ", g.M * g.D,
      "), got shape ", grad_output.sizes());
  const c10::cuda::CUDAGuard device_guard(value.device());

  // float for half, bfloat16 and float; double for double.
  const at::ScalarType acc_dtype = at::toAccumulateType(value.scalar_type(), /*is_cuda=*/true);
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_loc =
      at::zeros(sampling_locations.sizes(), sampling_locations.options().dtype(acc_dtype));
  at::Tensor grad_attn =
      at::zeros(attention_weights.sizes(), attention_weights.options().dtype(acc_dtype));

  const int64_t total = N * g.Q * g.M * g.D;
  if (total > 0) {
    const at::Tensor value_c = value.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous();
    const at::Tensor starts_c = level_start_index.contiguous();
    const at::Tensor loc_c = sampling_locations.contiguous();
    const at::Tensor attn_c = attention_weights.contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::acc_type<scalar_t, true>;
          ms_deform_attn_backward_kernel<scalar_t, acc_t>
              <<<num_blocks(total), kThreads, 0, stream>>>(
                  total,
                  g,
                  value_c.const_data_ptr<scalar_t>(),
                  shapes_c.const_data_ptr<int64_t>(),
                  starts_c.const_data_ptr<int64_t>(),
                  loc_c.const_data_ptr<scalar_t>(),
                  attn_c.const_data_ptr<scalar_t>(),
                  grad_output_c.const_data_ptr<scalar_t>(),
                  grad_value.mutable_data_ptr<acc_t>(),
                  grad_loc.mutable_data_ptr<acc_t>(),
                  grad_attn.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return std::make_tuple(
      grad_value.to(value.scalar_type()),
      grad_loc.to(sampling_locations.scalar_type()),
      grad_attn.to(attention_weights.scalar_type()));
}

}  // namespace dino_d2

TORCH_LIBRARY_IMPL(dino_d2, CUDA, m) {
  m.impl("ms_deform_attn_forward", TORCH_FN(dino_d2::ms_deform_attn_forward_cuda));
  m.impl("ms_deform_attn_backward", TORCH_FN(dino_d2::ms_deform_attn_backward_cuda));
}
