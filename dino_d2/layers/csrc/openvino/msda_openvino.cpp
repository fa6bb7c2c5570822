// Multi-scale deformable attention as an OpenVINO operation, so that an ONNX export run in
// OpenVINO samples the value maps with dino_d2's CPU kernel instead of the decomposed GridSample
// graph (about five times slower on the DINO encoder's shapes).
//
// The library registers two extensions (load it with `ov.Core().add_extension(path)`):
// * the operation dino_d2::MultiScaleDeformableAttention, evaluated on the CPU with the kernel of
//   ms_deform_attn_kernels.h (through msda_node.h, shared with the onnxruntime op), split between
//   OpenVINO's own threads;
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
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../msda_node.h"

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

node::Dims dims_of(const ov::Tensor& tensor) {
  const ov::Shape& shape = tensor.get_shape();
  return node::Dims(shape.begin(), shape.end());
}

// The element types of the five inputs; throws naming the first wrong one.
void check_types(const ov::TensorVector& inputs) {
  for (size_t i : {1, 2}) {
    const ov::element::Type type = inputs[i].get_element_type();
    OPENVINO_ASSERT(
        type == ov::element::i64 || type == ov::element::i32, node::error_prefix(),
        "spatial_shapes and level_start_index must be integers, got ", type);
  }
  OPENVINO_ASSERT(
      inputs[3].get_element_type() == ov::element::f32 &&
          inputs[4].get_element_type() == ov::element::f32,
      node::error_prefix(), "sampling_locations and attention_weights must be f32");
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

}  // namespace

bool MultiScaleDeformableAttention::evaluate(
    ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
  check_types(inputs);
  kernels::Sizes sz{};
  std::vector<kernels::Level> levels;
  try {
    sz = node::read_sizes(
        dims_of(inputs[0]), dims_of(inputs[1]), dims_of(inputs[2]), dims_of(inputs[3]),
        dims_of(inputs[4]));
    levels = node::read_levels(read_integers(inputs[1]), read_integers(inputs[2]), sz);
  } catch (const std::invalid_argument& e) {
    OPENVINO_THROW(e.what());
  }
  outputs[0].set_shape(
      ov::Shape{static_cast<size_t>(sz.batch), static_cast<size_t>(sz.queries),
                static_cast<size_t>(sz.heads * sz.channels)});
  const node::Forward forward(
      inputs[0].data<const float>(), sz, std::move(levels), inputs[3].data<const float>(),
      inputs[4].data<const float>(), outputs[0].data<float>());
  const int64_t blocks = forward.blocks();
  if (blocks == 0) {
    return true;
  }
  ov::parallel_nt(0, [&](const int thread, const int threads) {
    int64_t begin = 0;
    int64_t end = 0;
    ov::splitter(blocks, threads, thread, begin, end);
    forward.run(begin, end);
  });
  return true;
}

}  // namespace dino_d2

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<dino_d2::MultiScaleDeformableAttention>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<dino_d2::MultiScaleDeformableAttention>>(
         "MultiScaleDeformableAttention", "dino_d2")}));
