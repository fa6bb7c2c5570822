// Multi-scale deformable attention as an OpenVINO operation, so that an ONNX export run in
// OpenVINO samples the value maps with dino_d2's CPU kernel instead of the decomposed GridSample
// graph (about five times slower on the DINO encoder's shapes).
//
// The library registers two extensions (load it with `ov.Core().add_extension(path)`):
// * the operation dino_d2::MultiScaleDeformableAttention, evaluated on the CPU with the kernel of
//   ms_deform_attn_kernels.h, split between OpenVINO's own threads;
// * its ONNX conversion: a node MultiScaleDeformableAttention of domain "dino_d2" with the inputs
//   of torch.ops.dino_d2.ms_deform_attn_forward (value, spatial_shapes, level_start_index,
//   sampling_locations, attention_weights) becomes that operation. The level sizes may come as
//   i64 or i32 (the CPU plugin turns i64 into i32).
// float32 only: under OpenVINO's bfloat16 precision hint the CPU plugin keeps the inputs of an
// operation it does not know in float32.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../ms_deform_attn_kernels.h"

namespace dino_d2 {

class MultiScaleDeformableAttention : public ov::op::Op {
 public:
  OPENVINO_OP("MultiScaleDeformableAttention", "dino_d2");

  MultiScaleDeformableAttention() = default;

  explicit MultiScaleDeformableAttention(const ov::OutputVector& inputs) : Op(inputs) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(
        this, get_input_size() == 5,
        "takes 5 inputs (value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights), got ",
        get_input_size());
    const ov::element::Type type = get_input_element_type(0);
    NODE_VALIDATION_CHECK(
        this, type == ov::element::f32 || type.is_dynamic(), "value must be f32, got ", type);
    const ov::PartialShape& value = get_input_partial_shape(0);
    const ov::PartialShape& locations = get_input_partial_shape(3);
    ov::PartialShape output = ov::PartialShape::dynamic(3);
    if (value.rank().is_static() && locations.rank().is_static()) {
      NODE_VALIDATION_CHECK(
          this, value.rank().get_length() == 4 && locations.rank().get_length() == 6,
          "value must be (N, S, M, D) and sampling_locations (N, Q, M, L, P, 2), got ", value,
          " and ", locations);
      output = ov::PartialShape{value[0], locations[1], value[2] * value[3]};
    }
    set_output_type(0, type, output);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    return std::make_shared<MultiScaleDeformableAttention>(inputs);
  }

  bool visit_attributes(ov::AttributeVisitor&) override {
    return true;
  }

  bool has_evaluate() const override {
    return get_input_element_type(0) == ov::element::f32;
  }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
};

namespace {

using kernels::Layout;
using kernels::Level;
using kernels::Problem;
using kernels::Sizes;

// The sizes of the five inputs, checked against each other; throws naming the first mismatch.
Sizes check_sizes(const ov::TensorVector& inputs) {
  const ov::Shape& value = inputs[0].get_shape();
  const ov::Shape& shapes = inputs[1].get_shape();
  const ov::Shape& starts = inputs[2].get_shape();
  const ov::Shape& locations = inputs[3].get_shape();
  const ov::Shape& weights = inputs[4].get_shape();
  for (size_t i : {1, 2}) {
    const ov::element::Type type = inputs[i].get_element_type();
    OPENVINO_ASSERT(
        type == ov::element::i64 || type == ov::element::i32,
        "dino_d2::MultiScaleDeformableAttention: spatial_shapes and level_start_index must be "
        "integers, got ",
        type);
  }
  OPENVINO_ASSERT(
      inputs[3].get_element_type() == ov::element::f32 &&
          inputs[4].get_element_type() == ov::element::f32,
      "dino_d2::MultiScaleDeformableAttention: sampling_locations and attention_weights must be "
      "f32");
  OPENVINO_ASSERT(
      value.size() == 4 && locations.size() == 6 && weights.size() == 5 && shapes.size() == 2 &&
          starts.size() == 1,
      "dino_d2::MultiScaleDeformableAttention: expected value (N, S, M, D), spatial_shapes (L, 2), "
      "level_start_index (L,), sampling_locations (N, Q, M, L, P, 2), attention_weights "
      "(N, Q, M, L, P), got ",
      value, ", ", shapes, ", ", starts, ", ", locations, ", ", weights);
  Sizes sz{};
  sz.batch = static_cast<int64_t>(value[0]);
  sz.pixels = static_cast<int64_t>(value[1]);
  sz.heads = static_cast<int64_t>(value[2]);
  sz.channels = static_cast<int64_t>(value[3]);
  sz.queries = static_cast<int64_t>(locations[1]);
  sz.levels = static_cast<int64_t>(locations[3]);
  sz.points = static_cast<int64_t>(locations[4]);
  const ov::Shape expected_weights{value[0], locations[1], value[2], locations[3], locations[4]};
  OPENVINO_ASSERT(
      locations[0] == value[0] && locations[2] == value[2] && locations[5] == 2 &&
          weights == expected_weights && shapes[0] == locations[3] && shapes[1] == 2 &&
          starts[0] == locations[3],
      "dino_d2::MultiScaleDeformableAttention: inconsistent sizes: value ", value,
      ", spatial_shapes ", shapes, ", level_start_index ", starts, ", sampling_locations ",
      locations, ", attention_weights ", weights);
  return sz;
}

// The elements of an integer tensor, i64 or i32 (the CPU plugin computes with i32 indices).
std::vector<int64_t> read_integers(const ov::Tensor& tensor) {
  if (tensor.get_element_type() == ov::element::i64) {
    const int64_t* data = tensor.data<const int64_t>();
    return std::vector<int64_t>(data, data + tensor.get_size());
  }
  const int32_t* data = tensor.data<const int32_t>();
  return std::vector<int64_t>(data, data + tensor.get_size());
}

// The levels of spatial_shapes; throws when level_start_index or the pixel count disagree.
std::vector<Level> read_levels(const ov::TensorVector& inputs, const Sizes& sz) {
  const std::vector<int64_t> shapes = read_integers(inputs[1]);
  const std::vector<int64_t> starts = read_integers(inputs[2]);
  std::vector<Level> levels(sz.levels);
  int64_t total = 0;
  for (int64_t l = 0; l < sz.levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    OPENVINO_ASSERT(
        height >= 0 && width >= 0, "dino_d2::MultiScaleDeformableAttention: spatial_shapes[", l,
        "] = (", height, ", ", width, ") must not be negative");
    OPENVINO_ASSERT(
        starts[l] == total, "dino_d2::MultiScaleDeformableAttention: level_start_index[", l,
        "] must be ", total, ", got ", starts[l]);
    levels[l] = Level{height, width, total};
    total += height * width;
  }
  OPENVINO_ASSERT(
      total == sz.pixels, "dino_d2::MultiScaleDeformableAttention: value has S = ", sz.pixels,
      " pixels but spatial_shapes sums to ", total);
  return levels;
}

}  // namespace

bool MultiScaleDeformableAttention::evaluate(
    ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
  const Sizes sz = check_sizes(inputs);
  const std::vector<Level> levels = read_levels(inputs, sz);
  outputs[0].set_shape(
      ov::Shape{static_cast<size_t>(sz.batch), static_cast<size_t>(sz.queries),
                static_cast<size_t>(sz.heads * sz.channels)});
  const int64_t blocks = sz.batch * sz.queries * sz.heads;
  if (blocks == 0 || sz.channels == 0) {
    return true;
  }
  const std::vector<float> zeros(sz.channels, 0.0f);
  const Problem<float, float> pb{
      inputs[0].data<const float>(),
      Layout{sz.pixels * sz.heads * sz.channels, sz.channels, sz.heads * sz.channels},
      levels.data(),
      inputs[3].data<const float>(),
      inputs[4].data<const float>(),
      zeros.data(),
      sz};
  float* output = outputs[0].data<float>();
  const bool avx2 = kernels::cpu_has_avx2_fma();
  ov::parallel_nt(0, [&](const int thread, const int threads) {
    int64_t begin = 0;
    int64_t end = 0;
    ov::splitter(blocks, threads, thread, begin, end);
    if (begin >= end) {
      return;
    }
#ifdef DINO_D2_AVX2_CLONE
    if (avx2) {
      kernels::forward_range_avx2(pb, output, begin, end);
      return;
    }
#endif
    kernels::forward_range_baseline(pb, output, begin, end);
  });
  return true;
}

}  // namespace dino_d2

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<dino_d2::MultiScaleDeformableAttention>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<dino_d2::MultiScaleDeformableAttention>>(
         "MultiScaleDeformableAttention", "dino_d2")}));
