// Multi-scale deformable attention: the kernels behind torch.ops.dino_d2.ms_deform_attn_*.
//
// Shapes and conventions (identical for every backend):
//   value               (N, S, M, D)        S = sum over levels of H_l * W_l, M heads, D channels
//   spatial_shapes      (L, 2)   int64      (H_l, W_l) of each level
//   level_start_index   (L,)     int64      offset of level l in the S axis
//   sampling_locations  (N, Q, M, L, P, 2)  normalized (x, y); (0, 0) is the top-left corner of the
//                                           map and (1, 1) the bottom-right one
//   attention_weights   (N, Q, M, L, P)
//   output              (N, Q, M * D)
// Sampling is bilinear with zero padding outside the map, exactly like
// F.grid_sample(align_corners=False, padding_mode="zeros"): pixel x = loc_x * W_l - 0.5.
#pragma once

#include <torch/types.h>

#include <tuple>

namespace dino_d2 {

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace dino_d2
