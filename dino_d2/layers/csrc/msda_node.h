// dino_d2's MultiScaleDeformableAttention node as the ONNX runtimes see it, with no torch or
// runtime types: the checks of its five inputs and the forward pass over a range of blocks. The
// OpenVINO operation (openvino/msda_openvino.cpp) and the onnxruntime custom op
// (onnxruntime/msda_onnxruntime.cpp) both call these, each on its own threads.
//
// The inputs are those of torch.ops.dino_d2.ms_deform_attn_forward: value (N, S, M, D),
// spatial_shapes (L, 2), level_start_index (L,), sampling_locations (N, Q, M, L, P, 2),
// attention_weights (N, Q, M, L, P); the output is (N, Q, M * D). float32 only.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ms_deform_attn_kernels.h"

namespace dino_d2 {
namespace node {

using Dims = std::vector<int64_t>;

// The prefix of every error message, so that a runtime's error names the node.
inline const char* error_prefix() {
  return "dino_d2::MultiScaleDeformableAttention: ";
}

inline std::string format_dims(const Dims& dims) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    out << (i ? ", " : "") << dims[i];
  }
  out << ")";
  return out.str();
}

// The sizes of the five inputs, checked against each other; throws std::invalid_argument naming
// the first mismatch.
inline kernels::Sizes read_sizes(
    const Dims& value, const Dims& shapes, const Dims& starts, const Dims& locations,
    const Dims& weights) {
  if (value.size() != 4 || shapes.size() != 2 || starts.size() != 1 || locations.size() != 6 ||
      weights.size() != 5) {
    throw std::invalid_argument(
        std::string(error_prefix()) +
        "expected value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), "
        "sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P), got " +
        format_dims(value) + ", " + format_dims(shapes) + ", " + format_dims(starts) + ", " +
        format_dims(locations) + ", " + format_dims(weights));
  }
  const Dims expected_weights{value[0], locations[1], value[2], locations[3], locations[4]};
  if (locations[0] != value[0] || locations[2] != value[2] || locations[5] != 2 ||
      weights != expected_weights || shapes[0] != locations[3] || shapes[1] != 2 ||
      starts[0] != locations[3]) {
    throw std::invalid_argument(
        std::string(error_prefix()) + "inconsistent sizes: value " + format_dims(value) +
        ", spatial_shapes " + format_dims(shapes) + ", level_start_index " + format_dims(starts) +
        ", sampling_locations " + format_dims(locations) + ", attention_weights " +
        format_dims(weights));
  }
  kernels::Sizes sz{};
  sz.batch = value[0];
  sz.pixels = value[1];
  sz.heads = value[2];
  sz.channels = value[3];
  sz.queries = locations[1];
  sz.levels = locations[3];
  sz.points = locations[4];
  return sz;
}

// The levels of spatial_shapes (row-major (L, 2)); throws std::invalid_argument when a size is
// negative or level_start_index or the pixel count disagree with them.
inline std::vector<kernels::Level> read_levels(
    const std::vector<int64_t>& shapes, const std::vector<int64_t>& starts,
    const kernels::Sizes& sz) {
  std::vector<kernels::Level> levels(sz.levels);
  int64_t total = 0;
  for (int64_t l = 0; l < sz.levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    if (height < 0 || width < 0) {
      throw std::invalid_argument(
          std::string(error_prefix()) + "spatial_shapes[" + std::to_string(l) + "] = (" +
          std::to_string(height) + ", " + std::to_string(width) + ") must not be negative");
    }
    if (starts[l] != total) {
      throw std::invalid_argument(
          std::string(error_prefix()) + "level_start_index[" + std::to_string(l) +
          "] must be " + std::to_string(total) + ", got " + std::to_string(starts[l]));
    }
    levels[l] = kernels::Level{height, width, total};
    total += height * width;
  }
  if (total != sz.pixels) {
    throw std::invalid_argument(
        std::string(error_prefix()) + "value has S = " + std::to_string(sz.pixels) +
        " pixels but spatial_shapes sums to " + std::to_string(total));
  }
  return levels;
}

// The node's forward pass, ready to be split between threads: blocks() (n, q, m) triples, each
// computed by run(begin, end) into the (N, Q, M * D) output.
class Forward {
 public:
  Forward(
      const float* value, const kernels::Sizes& sz, std::vector<kernels::Level> levels,
      const float* locations, const float* weights, float* output)
      : levels_(std::move(levels)),
        zeros_(sz.channels, 0.0f),
        problem_{
            value,
            kernels::Layout{sz.pixels * sz.heads * sz.channels, sz.channels, sz.heads * sz.channels},
            levels_.data(),
            locations,
            weights,
            zeros_.data(),
            sz},
        output_(output),
        avx2_(kernels::cpu_has_avx2_fma()) {}
  Forward(const Forward&) = delete;  // problem_ points into levels_ and zeros_
  Forward& operator=(const Forward&) = delete;

  int64_t blocks() const {
    const kernels::Sizes& sz = problem_.sz;
    return sz.channels == 0 ? 0 : sz.batch * sz.queries * sz.heads;
  }

  void run(int64_t begin, int64_t end) const {
    if (begin >= end) {
      return;
    }
#ifdef DINO_D2_AVX2_CLONE
    if (avx2_) {
      kernels::forward_range_avx2(problem_, output_, begin, end);
      return;
    }
#endif
    kernels::forward_range_baseline(problem_, output_, begin, end);
  }

 private:
  std::vector<kernels::Level> levels_;
  std::vector<float> zeros_;
  kernels::Problem<float, float> problem_;
  float* output_;
  bool avx2_;
};

}  // namespace node
}  // namespace dino_d2
