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
// Sampled rows are fetched from random addresses, so both passes are software-pipelined: the
// corners of the next (n, q, m) are computed and their rows prefetched before the current one is
// accumulated. The innermost loops run over the D channels of one head (contiguous in every
// tensor); on x86 they are also compiled for AVX2 + FMA, used when the CPU has them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"

#if defined(__GNUC__)
#define DINO_D2_FLATTEN __attribute__((flatten))
#else
#define DINO_D2_FLATTEN
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DINO_D2_AVX2_CLONE 1
#endif

namespace dino_d2 {
namespace {

// One feature level inside the flattened S axis.
struct Level {
  int64_t height;
  int64_t width;
  int64_t start;
};

// Sizes shared by every kernel, read from the validated inputs.
struct Sizes {
  int64_t batch;     // N
  int64_t pixels;    // S
  int64_t heads;     // M
  int64_t channels;  // D
  int64_t queries;   // Q
  int64_t levels;    // L
  int64_t points;    // P
};

// Whether this CPU can run the AVX2 + FMA copy of the kernels.
bool cpu_has_avx2_fma() {
#ifdef DINO_D2_AVX2_CLONE
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// Asks the memory system for `bytes` bytes starting at `address`, one cache line at a time.
inline void prefetch(const void* address, int64_t bytes, bool for_write = false) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    if (for_write) {
      __builtin_prefetch(p + offset, 1);
    } else {
      __builtin_prefetch(p + offset, 0);
    }
  }
#endif
}

// The four bilinear corners of one sampling location, as in grid_sample(align_corners=False,
// padding_mode="zeros"). Corners are ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1); a corner
// outside the map has valid == false and must be ignored.
template <typename scalar_t>
struct Corners {
  int64_t pixel[4];       // index in the S axis (level start included)
  bool valid[4];
  scalar_t weight[4];     // bilinear weights
  scalar_t weight_dx[4];  // d weight / d x, x in pixels
  scalar_t weight_dy[4];  // d weight / d y, y in pixels
};

// Fills `c` for the normalized location (loc_x, loc_y) on `level`. Returns false when no corner
// lies inside the map (including non-finite locations); `c` is then unspecified.
template <typename scalar_t>
inline bool bilinear_corners(
    scalar_t loc_x, scalar_t loc_y, const Level& level, Corners<scalar_t>& c) {
  const scalar_t x = loc_x * static_cast<scalar_t>(level.width) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(level.height) - scalar_t(0.5);
  // Written so that NaN fails the test; it also keeps the integer casts below in range. At exactly
  // -1 the far corner has weight 1 and reads zero, but the location gradient is not zero: keep it,
  // as grid_sample and the CUDA kernel do.
  if (!(x >= scalar_t(-1) && x < static_cast<scalar_t>(level.width) && y >= scalar_t(-1) &&
        y < static_cast<scalar_t>(level.height))) {
    return false;
  }
  const scalar_t x_floor = std::floor(x);
  const scalar_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const scalar_t fx = x - x_floor;
  const scalar_t fy = y - y_floor;
  const scalar_t gx = scalar_t(1) - fx;
  const scalar_t gy = scalar_t(1) - fy;

  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < level.width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < level.height;
  const int64_t top = level.start + y0 * level.width + x0;
  const int64_t bottom = top + level.width;

  c.pixel[0] = top;
  c.pixel[1] = top + 1;
  c.pixel[2] = bottom;
  c.pixel[3] = bottom + 1;
  c.valid[0] = y0_in && x0_in;
  c.valid[1] = y0_in && x1_in;
  c.valid[2] = y1_in && x0_in;
  c.valid[3] = y1_in && x1_in;
  c.weight[0] = gy * gx;
  c.weight[1] = gy * fx;
  c.weight[2] = fy * gx;
  c.weight[3] = fy * fx;
  c.weight_dx[0] = -gy;
  c.weight_dx[1] = gy;
  c.weight_dx[2] = -fy;
  c.weight_dx[3] = fy;
  c.weight_dy[0] = -gx;
  c.weight_dy[1] = -fx;
  c.weight_dy[2] = gx;
  c.weight_dy[3] = fx;
  return true;
}

// out[d] += sum_k w[k] * row[k][d] for d < channels, in scalar_t whatever the rows' value_t.
template <typename scalar_t, typename value_t>
inline void accumulate_four(
    scalar_t* __restrict__ out,
    const value_t* __restrict__ row0,
    const value_t* __restrict__ row1,
    const value_t* __restrict__ row2,
    const value_t* __restrict__ row3,
    const scalar_t* w,
    int64_t channels) {
  const scalar_t w0 = w[0];
  const scalar_t w1 = w[1];
  const scalar_t w2 = w[2];
  const scalar_t w3 = w[3];
  for (int64_t d = 0; d < channels; ++d) {
    out[d] += w0 * static_cast<scalar_t>(row0[d]) + w1 * static_cast<scalar_t>(row1[d]) +
        w2 * static_cast<scalar_t>(row2[d]) + w3 * static_cast<scalar_t>(row3[d]);
  }
}

// grad_row[d] += alpha * grad_out[d] for d < channels; returns sum_d grad_out[d] * row[d].
// The dot product keeps kLanes partial sums so that the compiler can vectorise it without
// reassociating floating-point additions on its own.
template <typename scalar_t, typename value_t>
inline scalar_t dot_and_scatter(
    const scalar_t* __restrict__ grad_out,
    const value_t* __restrict__ row,
    scalar_t* __restrict__ grad_row,
    scalar_t alpha,
    int64_t channels) {
  constexpr int64_t kLanes = 8;
  scalar_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= channels; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      partial[k] += grad_out[d + k] * static_cast<scalar_t>(row[d + k]);
      grad_row[d + k] += alpha * grad_out[d + k];
    }
  }
  scalar_t tail = 0;
  for (; d < channels; ++d) {
    tail += grad_out[d] * static_cast<scalar_t>(row[d]);
    grad_row[d] += alpha * grad_out[d];
  }
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
      ((partial[4] + partial[5]) + (partial[6] + partial[7])) + tail;
}

// Where channel 0 of pixel s of head m of batch element n lives in value (and grad_value):
// n * batch + m * head + s * pixel. Channels are always contiguous.
struct Layout {
  int64_t batch;
  int64_t head;
  int64_t pixel;

  int64_t slab(int64_t n, int64_t m) const {
    return n * batch + m * head;
  }
};

// Pointers and sizes of one kernel call. value_t is the dtype of value (float, double or
// BFloat16); scalar_t, that of the locations, the weights and every sum (float for BFloat16).
template <typename scalar_t, typename value_t>
struct Problem {
  const value_t* value;
  Layout layout;
  const Level* levels;
  const scalar_t* sampling_locations;  // (N, Q, M, L, P, 2)
  const scalar_t* attention_weights;   // (N, Q, M, L, P)
  const value_t* zeros;                // D zeros
  Sizes sz;
};

// One sampling location of the forward pass, ready to accumulate: four rows of D channels and
// their weights (attention weight times bilinear weight). A corner outside the map has weight 0
// and points at a row of zeros.
template <typename scalar_t, typename value_t>
struct Tap {
  const value_t* row[4];
  scalar_t weight[4];
};

// Fills `taps` with the sampling locations of block (n, q, m) that touch the map, prefetches
// their rows and returns how many were written.
template <typename scalar_t, typename value_t>
inline int64_t plan_forward(
    const Problem<scalar_t, value_t>& pb, int64_t nqm, Tap<scalar_t, value_t>* taps) {
  const Sizes& sz = pb.sz;
  const int64_t samples = sz.levels * sz.points;
  const int64_t n = nqm / (sz.queries * sz.heads);
  const int64_t m = nqm % sz.heads;
  const value_t* value_nm = pb.value + pb.layout.slab(n, m);
  const scalar_t* loc = pb.sampling_locations + nqm * samples * 2;
  const scalar_t* attn = pb.attention_weights + nqm * samples;
  const int64_t row_bytes = sz.channels * static_cast<int64_t>(sizeof(value_t));
  const bool adjacent = pb.layout.pixel == sz.channels;
  Corners<scalar_t> c;
  int64_t count = 0;
  for (int64_t l = 0; l < sz.levels; ++l) {
    for (int64_t p = 0; p < sz.points; ++p) {
      const int64_t s = l * sz.points + p;
      if (!bilinear_corners(loc[2 * s], loc[2 * s + 1], pb.levels[l], c)) {
        continue;
      }
      Tap<scalar_t, value_t>& tap = taps[count++];
      for (int k = 0; k < 4; ++k) {
        tap.row[k] = c.valid[k] ? value_nm + c.pixel[k] * pb.layout.pixel : pb.zeros;
        tap.weight[k] = c.valid[k] ? attn[s] * c.weight[k] : scalar_t(0);
      }
      for (int k = 0; k < 4; k += 2) {
        if (adjacent && c.valid[k] && c.valid[k + 1]) {
          prefetch(tap.row[k], 2 * row_bytes);  // horizontal neighbours: one block
        } else {
          prefetch(tap.row[k], c.valid[k] ? row_bytes : 0);
          prefetch(tap.row[k + 1], c.valid[k + 1] ? row_bytes : 0);
        }
      }
    }
  }
  return count;
}

// Computes the output rows of blocks (n, q, m) in [begin, end). A row of a narrower value_t
// (BFloat16) is summed in a scalar_t row and rounded once, when it is stored.
template <typename scalar_t, typename value_t>
inline void forward_range(
    const Problem<scalar_t, value_t>& pb, value_t* output, int64_t begin, int64_t end) {
  constexpr bool widened = !std::is_same_v<scalar_t, value_t>;
  const int64_t channels = pb.sz.channels;
  const int64_t samples = pb.sz.levels * pb.sz.points;
  std::vector<Tap<scalar_t, value_t>> taps[2] = {
      std::vector<Tap<scalar_t, value_t>>(samples), std::vector<Tap<scalar_t, value_t>>(samples)};
  std::vector<scalar_t> sums(widened ? channels : 0);
  int64_t counts[2] = {plan_forward(pb, begin, taps[0].data()), 0};
  int slot = 0;
  for (int64_t nqm = begin; nqm < end; ++nqm) {
    if (nqm + 1 < end) {
      counts[1 - slot] = plan_forward(pb, nqm + 1, taps[1 - slot].data());
    }
    scalar_t* out;
    if constexpr (widened) {
      out = sums.data();
    } else {
      out = output + nqm * channels;
    }
    for (int64_t d = 0; d < channels; ++d) {
      out[d] = scalar_t(0);
    }
    for (int64_t t = 0; t < counts[slot]; ++t) {
      const Tap<scalar_t, value_t>& tap = taps[slot][t];
      accumulate_four(out, tap.row[0], tap.row[1], tap.row[2], tap.row[3], tap.weight, channels);
    }
    if constexpr (widened) {
      value_t* stored = output + nqm * channels;
      for (int64_t d = 0; d < channels; ++d) {
        stored[d] = static_cast<value_t>(out[d]);
      }
    }
    slot = 1 - slot;
  }
}

// Incoming and outgoing gradients of one backward call; grad_value has the layout of value.
template <typename scalar_t>
struct Grads {
  const scalar_t* output;        // (N, Q, M * D)
  scalar_t* value;               // (N, S, M, D) or (N, M, S, D)
  scalar_t* sampling_locations;  // (N, Q, M, L, P, 2)
  scalar_t* attention_weights;   // (N, Q, M, L, P)
};

// One sampling location of the backward pass.
template <typename scalar_t>
struct GradTap {
  Corners<scalar_t> corners;
  int64_t sample;  // l * P + p within its (n, q, m) block
  int64_t level;
};

// Fills `taps` with the sampling locations of block (n, q, m) that touch the map, prefetches
// their value and grad_value rows, and the inputs of the next query of the same head (M blocks
// further). Returns how many taps were written.
template <typename scalar_t, typename value_t>
inline int64_t plan_backward(
    const Problem<scalar_t, value_t>& pb,
    const Grads<scalar_t>& grads,
    int64_t n,
    int64_t q,
    int64_t m,
    GradTap<scalar_t>* taps) {
  const Sizes& sz = pb.sz;
  const int64_t samples = sz.levels * sz.points;
  const int64_t row_bytes = sz.channels * static_cast<int64_t>(sizeof(value_t));
  const int64_t grad_row_bytes = sz.channels * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t nqm = (n * sz.queries + q) * sz.heads + m;
  if (q + 1 < sz.queries) {
    const int64_t next = nqm + sz.heads;
    prefetch(pb.sampling_locations + next * samples * 2, 2 * samples * sizeof(scalar_t));
    prefetch(pb.attention_weights + next * samples, samples * sizeof(scalar_t));
    prefetch(grads.output + next * sz.channels, grad_row_bytes);
  }
  const int64_t slab = pb.layout.slab(n, m);
  const bool adjacent = pb.layout.pixel == sz.channels;
  const scalar_t* loc = pb.sampling_locations + nqm * samples * 2;
  int64_t count = 0;
  for (int64_t l = 0; l < sz.levels; ++l) {
    for (int64_t p = 0; p < sz.points; ++p) {
      const int64_t s = l * sz.points + p;
      GradTap<scalar_t>& tap = taps[count];
      Corners<scalar_t>& c = tap.corners;
      if (!bilinear_corners(loc[2 * s], loc[2 * s + 1], pb.levels[l], c)) {
        continue;
      }
      tap.sample = s;
      tap.level = l;
      for (int k = 0; k < 4; k += 2) {
        // Corners k and k + 1 are horizontal neighbours, possibly one block of memory.
        const bool pair = adjacent && c.valid[k] && c.valid[k + 1];
        for (int j = k; j < (pair ? k + 1 : k + 2); ++j) {
          if (c.valid[j]) {
            const int64_t offset = slab + c.pixel[j] * pb.layout.pixel;
            prefetch(pb.value + offset, (pair ? 2 : 1) * row_bytes);
            prefetch(grads.value + offset, (pair ? 2 : 1) * grad_row_bytes, true);
          }
        }
      }
      ++count;
    }
  }
  return count;
}

// Accumulates the gradients of every query for the heads (n, m) in [begin, end).
template <typename scalar_t, typename value_t>
inline void backward_range(
    const Problem<scalar_t, value_t>& pb,
    const Grads<scalar_t>& grads,
    int64_t begin,
    int64_t end) {
  const Sizes& sz = pb.sz;
  const int64_t samples = sz.levels * sz.points;
  std::vector<GradTap<scalar_t>> taps[2] = {
      std::vector<GradTap<scalar_t>>(samples), std::vector<GradTap<scalar_t>>(samples)};
  int64_t counts[2] = {0, 0};
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / sz.heads;
    const int64_t m = nm % sz.heads;
    const value_t* value_nm = pb.value + pb.layout.slab(n, m);
    scalar_t* grad_value_nm = grads.value + pb.layout.slab(n, m);
    int slot = 0;
    if (sz.queries > 0) {
      counts[0] = plan_backward(pb, grads, n, 0, m, taps[0].data());
    }
    for (int64_t q = 0; q < sz.queries; ++q) {
      if (q + 1 < sz.queries) {
        counts[1 - slot] = plan_backward(pb, grads, n, q + 1, m, taps[1 - slot].data());
      }
      const int64_t nqm = (n * sz.queries + q) * sz.heads + m;
      const scalar_t* attn = pb.attention_weights + nqm * samples;
      const scalar_t* grad_out = grads.output + nqm * sz.channels;
      scalar_t* grad_loc = grads.sampling_locations + nqm * samples * 2;
      scalar_t* grad_attn = grads.attention_weights + nqm * samples;
      // Samples with no corner on the map keep these zeros.
      for (int64_t s = 0; s < samples; ++s) {
        grad_attn[s] = scalar_t(0);
        grad_loc[2 * s] = scalar_t(0);
        grad_loc[2 * s + 1] = scalar_t(0);
      }
      for (int64_t t = 0; t < counts[slot]; ++t) {
        const GradTap<scalar_t>& tap = taps[slot][t];
        const Corners<scalar_t>& c = tap.corners;
        const scalar_t a = attn[tap.sample];
        scalar_t g_attn = 0;
        scalar_t g_x = 0;
        scalar_t g_y = 0;
        for (int k = 0; k < 4; ++k) {
          if (!c.valid[k]) {
            continue;
          }
          const int64_t offset = c.pixel[k] * pb.layout.pixel;
          const scalar_t dot = dot_and_scatter(
              grad_out, value_nm + offset, grad_value_nm + offset, a * c.weight[k], sz.channels);
          g_attn += c.weight[k] * dot;
          g_x += c.weight_dx[k] * dot;
          g_y += c.weight_dy[k] * dot;
        }
        const Level& level = pb.levels[tap.level];
        grad_attn[tap.sample] = g_attn;
        grad_loc[2 * tap.sample] = g_x * a * static_cast<scalar_t>(level.width);
        grad_loc[2 * tap.sample + 1] = g_y * a * static_cast<scalar_t>(level.height);
      }
      slot = 1 - slot;
    }
  }
}

// Two compiled copies of each range function: the baseline one, and on x86 one for AVX2 + FMA.
// `flatten` inlines the helpers so that their loops are vectorised for the copy's instruction set.
template <typename scalar_t, typename value_t>
DINO_D2_FLATTEN void forward_range_baseline(
    const Problem<scalar_t, value_t>& pb, value_t* output, int64_t begin, int64_t end) {
  forward_range(pb, output, begin, end);
}

template <typename scalar_t, typename value_t>
DINO_D2_FLATTEN void backward_range_baseline(
    const Problem<scalar_t, value_t>& pb,
    const Grads<scalar_t>& grads,
    int64_t begin,
    int64_t end) {
  backward_range(pb, grads, begin, end);
}

#ifdef DINO_D2_AVX2_CLONE
template <typename scalar_t, typename value_t>
__attribute__((target("avx2,fma"), flatten)) void forward_range_avx2(
    const Problem<scalar_t, value_t>& pb, value_t* output, int64_t begin, int64_t end) {
  forward_range(pb, output, begin, end);
}

template <typename scalar_t, typename value_t>
__attribute__((target("avx2,fma"), flatten)) void backward_range_avx2(
    const Problem<scalar_t, value_t>& pb,
    const Grads<scalar_t>& grads,
    int64_t begin,
    int64_t end) {
  backward_range(pb, grads, begin, end);
}
#endif

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
