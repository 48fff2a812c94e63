// Multi-scale deformable attention, CUDA implementation (declarations shared by the binding
// and the kernels). Inputs are validated and made contiguous by the callers in the .cpp file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ddl_mask2former {

// value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
// sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); all contiguous,
// on one CUDA device, float32 or float64. Returns (N, Lq, M * D).
// requested_channels_per_thread caps the channels one thread handles (1, 2 or 4; 0 = widest
// that fits); it exists to test and benchmark the kernel variants against each other.
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       int requested_channels_per_thread);

// Gradients with respect to value, sampling_locations and attention_weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int requested_channels_per_thread);

}  // namespace ddl_mask2former
