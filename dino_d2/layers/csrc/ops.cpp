// Operator registration for the dino_d2._C extension.
//
// Schemas live in the `dino_d2` namespace of the dispatcher; this file registers the CPU
// kernels, and csrc/cuda/ms_deform_attn_cuda.cu registers the CUDA ones when it is compiled.
// Importing dino_d2._C from Python runs these registrations. The fake (meta) kernels that
// torch.export and torch.compile trace with, and the autograd formula, are registered in Python by
// the module named in set_python_module below.
#include <torch/extension.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace dino_d2 {
namespace {

// True when the extension was compiled together with the CUDA kernels (-DWITH_CUDA).
bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace dino_d2

TORCH_LIBRARY(dino_d2, m) {
  m.set_python_module("dino_d2.layers.ms_deform_attn");
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("compiled_with_cuda() -> bool", &dino_d2::compiled_with_cuda);
}

TORCH_LIBRARY_IMPL(dino_d2, CPU, m) {
  m.impl("ms_deform_attn_forward", &dino_d2::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &dino_d2::ms_deform_attn_backward_cpu);
}

// Nothing is bound through pybind11: the module exists so that `import dino_d2._C` loads the
// library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
