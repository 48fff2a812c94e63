// CUDA kernels of multi-scale deformable attention.
//
// One thread per (n, q, m) and pack of V consecutive channels (V = 4, 2 or 1, the widest that
// divides the head dim and keeps the pointers aligned): consecutive threads walk the channels,
// so value reads of a head are coalesced vector loads and the D / V threads of a head share
// every sampling point. Bilinear sampling uses pixel centers at (i + 0.5) / size and zero
// padding, exactly like grid_sample(align_corners=False). The backward pass scatters value
// gradients with atomicAdd (vector atomics on sm_90+) and reduces the per-point gradients over
// the threads of a head with warp shuffles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "ms_deform_attn.h"

namespace ddl_mask2former {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxBlocks = 65535;

struct Layout {
  int64_t batch, total_len, n_heads, head_dim, n_queries, n_levels, n_points;
};

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* address) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(address);
}

// Corner geometry of one bilinear sample; `inside` is false when no corner touches the map.
template <typename scalar_t>
struct Bilinear {
  int x0, y0;
  scalar_t fx, fy;
  bool inside;
};

template <typename scalar_t>
__device__ __forceinline__ Bilinear<scalar_t> locate(scalar_t loc_x, scalar_t loc_y, int height,
                                                     int width) {
  Bilinear<scalar_t> b;
  const scalar_t x = loc_x * width - scalar_t(0.5);
  const scalar_t y = loc_y * height - scalar_t(0.5);
  const scalar_t x_floor = floor(x);
  const scalar_t y_floor = floor(y);
  // Compared in floating point first so huge or NaN locations never reach an int conversion.
  b.inside = x_floor >= scalar_t(-1) && x_floor < scalar_t(width) && y_floor >= scalar_t(-1) &&
             y_floor < scalar_t(height);
  b.x0 = b.inside ? static_cast<int>(x_floor) : 0;
  b.y0 = b.inside ? static_cast<int>(y_floor) : 0;
  b.fx = b.inside ? x - x_floor : scalar_t(0);
  b.fy = b.inside ? y - y_floor : scalar_t(0);
  return b;
}

__device__ __forceinline__ bool in_map(int row, int col, int height, int width) {
  return row >= 0 && row < height && col >= 0 && col < width;
}

template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> corner_pack(const scalar_t* level_value, int row,
                                                         int col, int height, int width,
                                                         int64_t pixel_stride) {
  if (!in_map(row, col, height, width)) {
    Pack<scalar_t, V> zero;
#pragma unroll
    for (int i = 0; i < V; ++i) zero.v[i] = scalar_t(0);
    return zero;
  }
  return load_pack<scalar_t, V>(level_value + (static_cast<int64_t>(row) * width + col) * pixel_stride);
}

template <typename scalar_t, int V>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights,
                               scalar_t* __restrict__ output, Layout s, int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t packs_per_head = s.head_dim / V;
  const int64_t pixel_stride = s.n_heads * s.head_dim;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    const int64_t head_index = index / packs_per_head;  // (n * Lq + q) * M + m
    const int64_t d = (index - head_index * packs_per_head) * V;
    const int64_t m = head_index % s.n_heads;
    const int64_t n = head_index / (s.n_heads * s.n_queries);
    const int64_t point_base = head_index * s.n_levels * s.n_points;
    const scalar_t* value_nm = value + n * s.total_len * pixel_stride + m * s.head_dim + d;
    scalar_t accumulated[V];
#pragma unroll
    for (int i = 0; i < V; ++i) accumulated[i] = scalar_t(0);
    for (int64_t l = 0; l < s.n_levels; ++l) {
      const int height = static_cast<int>(spatial_shapes[2 * l]);
      const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* level_value = value_nm + level_start_index[l] * pixel_stride;
      for (int64_t p = 0; p < s.n_points; ++p) {
        const int64_t point = point_base + l * s.n_points + p;
        const Bilinear<scalar_t> b =
            locate(sampling_locations[2 * point], sampling_locations[2 * point + 1], height, width);
        if (!b.inside) continue;
        const scalar_t weight = attention_weights[point];
        const auto v00 = corner_pack<scalar_t, V>(level_value, b.y0, b.x0, height, width, pixel_stride);
        const auto v01 = corner_pack<scalar_t, V>(level_value, b.y0, b.x0 + 1, height, width, pixel_stride);
        const auto v10 = corner_pack<scalar_t, V>(level_value, b.y0 + 1, b.x0, height, width, pixel_stride);
        const auto v11 = corner_pack<scalar_t, V>(level_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const scalar_t top = v00.v[i] + (v01.v[i] - v00.v[i]) * b.fx;
          const scalar_t bottom = v10.v[i] + (v11.v[i] - v10.v[i]) * b.fx;
          accumulated[i] += weight * (top + (bottom - top) * b.fy);
        }
      }
    }
    Pack<scalar_t, V> result;
#pragma unroll
    for (int i = 0; i < V; ++i) result.v[i] = accumulated[i];
    *reinterpret_cast<Pack<scalar_t, V>*>(output + index * V) = result;
  }
}

// Adds V consecutive gradients; one vector atomic where the hardware has it (sm_90+, float).
template <typename scalar_t, int V>
__device__ __forceinline__ void atomic_add_pack(scalar_t* address, const scalar_t (&amount)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(address + i, amount[i]);
}

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
template <>
__device__ __forceinline__ void atomic_add_pack<float, 4>(float* address, const float (&amount)[4]) {
  atomicAdd(reinterpret_cast<float4*>(address), make_float4(amount[0], amount[1], amount[2], amount[3]));
}
template <>
__device__ __forceinline__ void atomic_add_pack<float, 2>(float* address, const float (&amount)[2]) {
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(amount[0], amount[1]));
}
#endif

template <typename scalar_t, int V>
__device__ __forceinline__ void scatter_corner(scalar_t* level_grad_value, int row, int col,
                                               int height, int width, int64_t pixel_stride,
                                               const scalar_t (&grad)[V], scalar_t corner_weight) {
  if (!in_map(row, col, height, width)) return;
  scalar_t amount[V];
#pragma unroll
  for (int i = 0; i < V; ++i) amount[i] = grad[i] * corner_weight;
  atomic_add_pack<scalar_t, V>(level_grad_value + (static_cast<int64_t>(row) * width + col) * pixel_stride,
                               amount);
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane must take part.
template <typename scalar_t>
__device__ __forceinline__ scalar_t group_sum(scalar_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, int V>
__global__ void backward_kernel(const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start_index,
                                const scalar_t* __restrict__ sampling_locations,
                                const scalar_t* __restrict__ attention_weights,
                                const scalar_t* __restrict__ grad_output,
                                scalar_t* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights, Layout s, int64_t total,
                                int group_width, bool group_owns_point) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t packs_per_head = s.head_dim / V;
  const int64_t pixel_stride = s.n_heads * s.head_dim;
  // Whole warps iterate together (total rounded up) so the shuffles below see every lane.
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       index < padded_total; index += stride) {
    const bool active = index < total;
    const int64_t safe_index = active ? index : total - 1;
    const int64_t head_index = safe_index / packs_per_head;
    const int64_t pack = safe_index - head_index * packs_per_head;
    const int64_t d = pack * V;
    const int64_t m = head_index % s.n_heads;
    const int64_t n = head_index / (s.n_heads * s.n_queries);
    const int64_t point_base = head_index * s.n_levels * s.n_points;
    const int64_t value_offset = n * s.total_len * pixel_stride + m * s.head_dim + d;
    const scalar_t* value_nm = value + value_offset;
    scalar_t* grad_value_nm = grad_value + value_offset;
    scalar_t grad_out[V];
    {
      const auto loaded = load_pack<scalar_t, V>(grad_output + safe_index * V);
#pragma unroll
      for (int i = 0; i < V; ++i) grad_out[i] = active ? loaded.v[i] : scalar_t(0);
    }
    const bool group_leader = (pack % group_width) == 0;
    for (int64_t l = 0; l < s.n_levels; ++l) {
      const int height = static_cast<int>(spatial_shapes[2 * l]);
      const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
      const int64_t level_offset = level_start_index[l] * pixel_stride;
      const scalar_t* level_value = value_nm + level_offset;
      scalar_t* level_grad_value = grad_value_nm + level_offset;
      for (int64_t p = 0; p < s.n_points; ++p) {
        const int64_t point = point_base + l * s.n_points + p;
        const Bilinear<scalar_t> b =
            locate(sampling_locations[2 * point], sampling_locations[2 * point + 1], height, width);
        scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
        if (active && b.inside) {
          const scalar_t weight = attention_weights[point];
          const auto v00 = corner_pack<scalar_t, V>(level_value, b.y0, b.x0, height, width, pixel_stride);
          const auto v01 = corner_pack<scalar_t, V>(level_value, b.y0, b.x0 + 1, height, width, pixel_stride);
          const auto v10 = corner_pack<scalar_t, V>(level_value, b.y0 + 1, b.x0, height, width, pixel_stride);
          const auto v11 = corner_pack<scalar_t, V>(level_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride);
          const scalar_t gx = scalar_t(1) - b.fx, gy = scalar_t(1) - b.fy;
          scalar_t dx_sum = 0, dy_sum = 0;
          scalar_t weighted_grad[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const scalar_t sample = gy * (gx * v00.v[i] + b.fx * v01.v[i]) + b.fy * (gx * v10.v[i] + b.fx * v11.v[i]);
            grad_weight += grad_out[i] * sample;
            // d sample / d x_pixel and / d y_pixel, weighted by the incoming gradient.
            dx_sum += grad_out[i] * (gy * (v01.v[i] - v00.v[i]) + b.fy * (v11.v[i] - v10.v[i]));
            dy_sum += grad_out[i] * (gx * (v10.v[i] - v00.v[i]) + b.fx * (v11.v[i] - v01.v[i]));
            weighted_grad[i] = grad_out[i] * weight;
          }
          // The chain rule from pixel to [0, 1] coordinates multiplies by W and H.
          grad_x = weight * width * dx_sum;
          grad_y = weight * height * dy_sum;
          scatter_corner<scalar_t, V>(level_grad_value, b.y0, b.x0, height, width, pixel_stride, weighted_grad, gy * gx);
          scatter_corner<scalar_t, V>(level_grad_value, b.y0, b.x0 + 1, height, width, pixel_stride, weighted_grad, gy * b.fx);
          scatter_corner<scalar_t, V>(level_grad_value, b.y0 + 1, b.x0, height, width, pixel_stride, weighted_grad, b.fy * gx);
          scatter_corner<scalar_t, V>(level_grad_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride, weighted_grad, b.fy * b.fx);
        }
        grad_weight = group_sum(grad_weight, group_width);
        grad_x = group_sum(grad_x, group_width);
        grad_y = group_sum(grad_y, group_width);
        if (active && group_leader) {
          if (group_owns_point) {
            grad_weights[point] = grad_weight;
            grad_locations[2 * point] = grad_x;
            grad_locations[2 * point + 1] = grad_y;
          } else {
            atomicAdd(grad_weights + point, grad_weight);
            atomicAdd(grad_locations + 2 * point, grad_x);
            atomicAdd(grad_locations + 2 * point + 1, grad_y);
          }
        }
      }
    }
  }
}

Layout layout_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Layout{value.size(0),              value.size(1),
                value.size(2),              value.size(3),
                sampling_locations.size(1), sampling_locations.size(3),
                sampling_locations.size(4)};
}

int blocks_for(int64_t threads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (threads + kThreadsPerBlock - 1) / kThreadsPerBlock)));
}

bool aligned_to(const at::Tensor& tensor, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(tensor.data_ptr()) % bytes == 0;
}

// Channels per thread: the widest of 4, 2, 1 that divides D and keeps every vector access
// aligned; `requested` (1, 2 or 4) caps it, 0 means no cap.
int channels_per_thread(int64_t head_dim, std::initializer_list<const at::Tensor*> tensors,
                        int requested) {
  for (int width : {4, 2}) {
    if (requested != 0 && width > requested) continue;
    if (head_dim % width != 0) continue;
    bool aligned = true;
    for (const at::Tensor* tensor : tensors) {
      aligned = aligned && aligned_to(*tensor, width * tensor->element_size());
    }
    if (aligned) return width;
  }
  return 1;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       int requested_channels_per_thread) {
  const Layout s = layout_of(value, sampling_locations);
  auto output = at::empty({s.batch, s.n_queries, s.n_heads * s.head_dim}, value.options());
  if (output.numel() == 0) return output;
  const int vector_width =
      channels_per_thread(s.head_dim, {&value, &output}, requested_channels_per_thread);
  const int64_t total = output.numel() / vector_width;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_width == 4) {
      launch(forward_kernel<scalar_t, 4>);
    } else if (vector_width == 2) {
      launch(forward_kernel<scalar_t, 2>);
    } else {
      launch(forward_kernel<scalar_t, 1>);
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int requested_channels_per_thread) {
  const Layout s = layout_of(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0) return {grad_value, grad_locations, grad_weights};
  const int vector_width = channels_per_thread(
      s.head_dim, {&value, &grad_value, &grad_output}, requested_channels_per_thread);
  const int64_t total = grad_output.numel() / vector_width;
  // The D / V threads of a head reduce their point gradients together: in one shuffle group
  // when that is a power of two up to a warp, else per warp (a multiple of 32) or per thread.
  const int64_t threads_per_head = s.head_dim / vector_width;
  const bool power_of_two = (threads_per_head & (threads_per_head - 1)) == 0;
  int group_width = 1;
  if (power_of_two && threads_per_head <= kWarpSize) {
    group_width = static_cast<int>(threads_per_head);
  } else if (threads_per_head % kWarpSize == 0) {
    group_width = kWarpSize;
  }
  const bool group_owns_point = group_width == threads_per_head;
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<blocks_for(padded_total), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
          grad_weights.data_ptr<scalar_t>(), s, total, group_width, group_owns_point);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_width == 4) {
      launch(backward_kernel<scalar_t, 4>);
    } else if (vector_width == 2) {
      launch(backward_kernel<scalar_t, 2>);
    } else {
      launch(backward_kernel<scalar_t, 1>);
    }
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace ddl_mask2former
