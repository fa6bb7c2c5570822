// The CPU kernels of multi-scale deformable attention on raw pointers, with no torch types: the
// torch op (ms_deform_attn_cpu.cpp) and the OpenVINO extension (openvino/msda_openvino.cpp) both
// run them. See ms_deform_attn_cpu.cpp for how the work is split between threads.
//
// Sampled rows are fetched from random addresses, so both passes are software-pipelined: the
// corners of the next (n, q, m) are computed and their rows prefetched before the current one is
// accumulated. The innermost loops run over the D channels of one head (contiguous in every
// tensor); on x86 they are also compiled for AVX2 + FMA, used when the CPU has them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__GNUC__)
#define DINO_D2_FLATTEN __attribute__((flatten))
#else
#define DINO_D2_FLATTEN
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DINO_D2_AVX2_CLONE 1
#endif

namespace dino_d2 {
namespace kernels {

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
inline bool cpu_has_avx2_fma() {
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

}  // namespace kernels
}  // namespace dino_d2
