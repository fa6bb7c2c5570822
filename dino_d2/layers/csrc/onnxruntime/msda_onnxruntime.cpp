// Multi-scale deformable attention as an onnxruntime custom op, so that an ONNX export run in
// onnxruntime samples the value maps with dino_d2's CPU kernel instead of the decomposed
// GridSample graph (about five times slower on the DINO encoder's shapes).
//
// The library registers the node MultiScaleDeformableAttention of domain "dino_d2", the node that
// OpenVINO runs with openvino/msda_openvino.cpp: one ONNX file serves both runtimes. Load it with
// `onnxruntime.SessionOptions().register_custom_ops_library(path)`. Its inputs are those of
// torch.ops.dino_d2.ms_deform_attn_forward (value, spatial_shapes, level_start_index,
// sampling_locations, attention_weights; the level sizes as int64), float32 only. The blocks
// (n, q, m) are split between the session's intra-op threads.
//
// Only onnxruntime's C API is used, through its C++ wrappers and the headers alone: the library
// does not link libonnxruntime but receives the API table from the session that loads it, so
// headers of API version 21 (onnxruntime 1.21) serve every later onnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../msda_node.h"

namespace dino_d2 {
namespace {

// (n, q, m) blocks per task of the thread pool: large enough that a task's planning and prefetch
// pipeline fill up, small enough that two to hundreds of threads stay balanced.
constexpr int64_t kBlocksPerTask = 512;

std::vector<int64_t> elements(const Ort::Custom::Tensor<int64_t>& tensor) {
  const int64_t* data = tensor.Data();
  return std::vector<int64_t>(data, data + tensor.NumberOfElement());
}

void run_task(void* forward, size_t task) {
  const auto* fw = static_cast<const node::Forward*>(forward);
  const int64_t begin = static_cast<int64_t>(task) * kBlocksPerTask;
  fw->run(begin, std::min(begin + kBlocksPerTask, fw->blocks()));
}

Ort::Status compute(
    OrtKernelContext* context,
    const Ort::Custom::Tensor<float>& value,
    const Ort::Custom::Tensor<int64_t>& spatial_shapes,
    const Ort::Custom::Tensor<int64_t>& level_start_index,
    const Ort::Custom::Tensor<float>& sampling_locations,
    const Ort::Custom::Tensor<float>& attention_weights,
    Ort::Custom::Tensor<float>& output) {
  try {
    const kernels::Sizes sz = node::read_sizes(
        value.Shape(), spatial_shapes.Shape(), level_start_index.Shape(),
        sampling_locations.Shape(), attention_weights.Shape());
    std::vector<kernels::Level> levels =
        node::read_levels(elements(spatial_shapes), elements(level_start_index), sz);
    float* out = output.Allocate({sz.batch, sz.queries, sz.heads * sz.channels});
    const node::Forward forward(
        value.Data(), sz, std::move(levels), sampling_locations.Data(), attention_weights.Data(),
        out);
    const int64_t tasks = (forward.blocks() + kBlocksPerTask - 1) / kBlocksPerTask;
    if (tasks > 0) {
      Ort::KernelContext(context).ParallelFor(
          run_task, static_cast<size_t>(tasks), 0, const_cast<node::Forward*>(&forward));
    }
  } catch (const std::invalid_argument& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
  } catch (const std::exception& e) {
    return Ort::Status(
        (std::string(node::error_prefix()) + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
  return Ort::Status{nullptr};
}

}  // namespace
}  // namespace dino_d2

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An onnxruntime older than 1.21; version 1 of its API is enough to say so.
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "dino_d2's custom op library needs onnxruntime 1.21 or newer (API version 21)");
  }
  Ort::InitApi(api);
  // The domain must outlive every session that uses it: built once, added to each session.
  static std::once_flag once;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op;
  try {
    std::call_once(once, [] {
      op.reset(Ort::Custom::CreateLiteCustomOp(
          "MultiScaleDeformableAttention", "CPUExecutionProvider", dino_d2::compute));
      domain = std::make_unique<Ort::CustomOpDomain>("dino_d2");
      domain->Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_FAIL).release();
  }
  return nullptr;
}
