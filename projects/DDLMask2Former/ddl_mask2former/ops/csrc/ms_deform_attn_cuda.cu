// CUDA kernels of multi-scale deformable attention.
//
// One thread per output element (n, q, m, d): consecutive threads walk the channel d, so the
// value reads of a head are coalesced and the D threads of a head share every sampling point.
// Bilinear sampling uses pixel centers at (i + 0.5) / size and zero padding, exactly like
// grid_sample(align_corners=False). The backward pass scatters value gradients with atomicAdd
// and reduces the per-point gradients over the D channels with warp shuffles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

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

template <typename scalar_t>
__device__ __forceinline__ scalar_t corner_value(const scalar_t* level_value, int row, int col,
                                                 int height, int width, int64_t pixel_stride) {
  if (row < 0 || row >= height || col < 0 || col >= width) return scalar_t(0);
  return level_value[(static_cast<int64_t>(row) * width + col) * pixel_stride];
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights,
                               scalar_t* __restrict__ output, Layout s, int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t pixel_stride = s.n_heads * s.head_dim;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    const int64_t d = index % s.head_dim;
    const int64_t m = (index / s.head_dim) % s.n_heads;
    const int64_t q = (index / pixel_stride) % s.n_queries;
    const int64_t n = index / (pixel_stride * s.n_queries);
    const int64_t point_base = ((n * s.n_queries + q) * s.n_heads + m) * s.n_levels * s.n_points;
    const scalar_t* value_nm = value + n * s.total_len * pixel_stride + m * s.head_dim + d;
    scalar_t accumulated = 0;
    for (int64_t l = 0; l < s.n_levels; ++l) {
      const int height = static_cast<int>(spatial_shapes[2 * l]);
      const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* level_value = value_nm + level_start_index[l] * pixel_stride;
      for (int64_t p = 0; p < s.n_points; ++p) {
        const int64_t point = point_base + l * s.n_points + p;
        const Bilinear<scalar_t> b =
            locate(sampling_locations[2 * point], sampling_locations[2 * point + 1], height, width);
        if (!b.inside) continue;
        const scalar_t v00 = corner_value(level_value, b.y0, b.x0, height, width, pixel_stride);
        const scalar_t v01 = corner_value(level_value, b.y0, b.x0 + 1, height, width, pixel_stride);
        const scalar_t v10 = corner_value(level_value, b.y0 + 1, b.x0, height, width, pixel_stride);
        const scalar_t v11 = corner_value(level_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride);
        const scalar_t top = v00 + (v01 - v00) * b.fx;
        const scalar_t bottom = v10 + (v11 - v10) * b.fx;
        accumulated += attention_weights[point] * (top + (bottom - top) * b.fy);
      }
    }
    output[index] = accumulated;
  }
}

template <typename scalar_t>
__device__ __forceinline__ void scatter_corner(scalar_t* level_grad_value, int row, int col,
                                               int height, int width, int64_t pixel_stride,
                                               scalar_t amount) {
  if (row < 0 || row >= height || col < 0 || col >= width) return;
  atomicAdd(level_grad_value + (static_cast<int64_t>(row) * width + col) * pixel_stride, amount);
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane must take part.
template <typename scalar_t>
__device__ __forceinline__ scalar_t group_sum(scalar_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t>
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
  const int64_t pixel_stride = s.n_heads * s.head_dim;
  // Whole warps iterate together (total rounded up) so the shuffles below see every lane.
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       index < padded_total; index += stride) {
    const bool active = index < total;
    const int64_t safe_index = active ? index : total - 1;
    const int64_t d = safe_index % s.head_dim;
    const int64_t m = (safe_index / s.head_dim) % s.n_heads;
    const int64_t q = (safe_index / pixel_stride) % s.n_queries;
    const int64_t n = safe_index / (pixel_stride * s.n_queries);
    const int64_t point_base = ((n * s.n_queries + q) * s.n_heads + m) * s.n_levels * s.n_points;
    const int64_t value_offset = n * s.total_len * pixel_stride + m * s.head_dim + d;
    const scalar_t* value_nm = value + value_offset;
    scalar_t* grad_value_nm = grad_value + value_offset;
    const scalar_t grad_out = active ? grad_output[safe_index] : scalar_t(0);
    const bool group_leader = (d % group_width) == 0;
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
        scalar_t sample = 0, grad_x = 0, grad_y = 0;
        if (active && b.inside) {
          const scalar_t weight = attention_weights[point];
          const scalar_t v00 = corner_value(level_value, b.y0, b.x0, height, width, pixel_stride);
          const scalar_t v01 = corner_value(level_value, b.y0, b.x0 + 1, height, width, pixel_stride);
          const scalar_t v10 = corner_value(level_value, b.y0 + 1, b.x0, height, width, pixel_stride);
          const scalar_t v11 = corner_value(level_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride);
          const scalar_t gx = scalar_t(1) - b.fx, gy = scalar_t(1) - b.fy;
          sample = gy * (gx * v00 + b.fx * v01) + b.fy * (gx * v10 + b.fx * v11);
          // d sample / d x_pixel and / d y_pixel; the chain rule to [0, 1] coordinates adds W, H.
          grad_x = grad_out * weight * width * (gy * (v01 - v00) + b.fy * (v11 - v10));
          grad_y = grad_out * weight * height * (gx * (v10 - v00) + b.fx * (v11 - v01));
          const scalar_t scaled = grad_out * weight;
          scatter_corner(level_grad_value, b.y0, b.x0, height, width, pixel_stride, scaled * gy * gx);
          scatter_corner(level_grad_value, b.y0, b.x0 + 1, height, width, pixel_stride, scaled * gy * b.fx);
          scatter_corner(level_grad_value, b.y0 + 1, b.x0, height, width, pixel_stride, scaled * b.fy * gx);
          scatter_corner(level_grad_value, b.y0 + 1, b.x0 + 1, height, width, pixel_stride, scaled * b.fy * b.fx);
        }
        scalar_t grad_weight = grad_out * sample;
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

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const Layout s = layout_of(value, sampling_locations);
  auto output = at::empty({s.batch, s.n_queries, s.n_heads * s.head_dim}, value.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Layout s = layout_of(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  const int64_t total = s.batch * s.n_queries * s.n_heads * s.head_dim;
  if (total == 0) return {grad_value, grad_locations, grad_weights};
  // The D channel threads of a head reduce their point gradients together: in one shuffle group
  // when D is a power of two up to a warp, else per warp (D a multiple of 32) or per thread.
  const int64_t head_dim = s.head_dim;
  const bool power_of_two = (head_dim & (head_dim - 1)) == 0;
  int group_width = 1;
  if (power_of_two && head_dim <= kWarpSize) {
    group_width = static_cast<int>(head_dim);
  } else if (head_dim % kWarpSize == 0) {
    group_width = kWarpSize;
  }
  const bool group_owns_point = group_width == head_dim;
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    backward_kernel<scalar_t><<<blocks_for(padded_total), kThreadsPerBlock, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>(), s, total, group_width, group_owns_point);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace ddl_mask2former
