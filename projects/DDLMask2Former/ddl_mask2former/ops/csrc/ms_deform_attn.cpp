// Python bindings of the multi-scale deformable attention CUDA op: argument checks, the CUDA
// device guard, and the float16/bfloat16 policy.
//
// Half precision policy: float16 and bfloat16 inputs are explicitly up-cast to float32, the
// float32 kernels run, and results are cast back to the input dtypes. Accumulating sampled
// values and scattering gradients with atomics in 16-bit would lose too much precision.
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "ms_deform_attn.h"

namespace ddl_mask2former {
namespace {

// Error messages are built from strings only: formatting integers through the ostream inlined
// here crashed (segfault) on the GPU machine's toolchain, while string arguments did not.
std::string shape_of(const at::Tensor& tensor) {
  std::string text = "(";
  for (int64_t i = 0; i < tensor.dim(); ++i) {
    text += (i ? ", " : "") + std::to_string(tensor.size(i));
  }
  return text + ")";
}

void check_on_device(const char* name, const at::Tensor& tensor, const at::Tensor& value) {
  TORCH_CHECK(tensor.is_cuda(), "ms_deform_attn: ", name, " must be a CUDA tensor, got one on ",
              tensor.device().str());
  TORCH_CHECK(tensor.device() == value.device(), "ms_deform_attn: ", name, " is on ",
              tensor.device().str(), " but value is on ", value.device().str());
}

void check_floating(const char* name, const at::Tensor& tensor) {
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "ms_deform_attn: ", name, " has unsupported dtype ", c10::toString(dtype),
              " (float32, float64, float16 and bfloat16 are supported)");
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights, int64_t channels_per_thread) {
  check_on_device("value", value, value);
  check_on_device("spatial_shapes", spatial_shapes, value);
  check_on_device("level_start_index", level_start_index, value);
  check_on_device("sampling_locations", sampling_locations, value);
  check_on_device("attention_weights", attention_weights, value);
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", shape_of(value));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", shape_of(spatial_shapes));
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const int64_t n_levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == n_levels,
              "ms_deform_attn: level_start_index must be (", std::to_string(n_levels), ",), got ",
              shape_of(level_start_index));
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              shape_of(sampling_locations));
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) &&
                  sampling_locations.size(2) == value.size(2) &&
                  sampling_locations.size(3) == n_levels,
              "ms_deform_attn: sampling_locations ", shape_of(sampling_locations),
              " do not match value ", shape_of(value), " and ", std::to_string(n_levels), " levels");
  bool weights_match = attention_weights.dim() == 5;
  for (int64_t i = 0; weights_match && i < 5; ++i) {
    weights_match = attention_weights.size(i) == sampling_locations.size(i);
  }
  TORCH_CHECK(weights_match, "ms_deform_attn: attention_weights must have the first five sizes of ",
              "sampling_locations ", shape_of(sampling_locations), ", got ",
              shape_of(attention_weights));
  check_floating("value", value);
  check_floating("sampling_locations", sampling_locations);
  check_floating("attention_weights", attention_weights);
  TORCH_CHECK(channels_per_thread == 0 || channels_per_thread == 1 || channels_per_thread == 2 ||
                  channels_per_thread == 4,
              "ms_deform_attn: channels_per_thread must be 0 (widest), 1, 2 or 4, got ",
              std::to_string(channels_per_thread));
}

// The dtype the kernels run in: float64 if any input is float64, else float32.
at::ScalarType compute_type(const at::Tensor& value, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const bool any_double = value.scalar_type() == at::kDouble ||
                          sampling_locations.scalar_type() == at::kDouble ||
                          attention_weights.scalar_type() == at::kDouble;
  return any_double ? at::kDouble : at::kFloat;
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, int64_t channels_per_thread) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
               channels_per_thread);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto kernel_type = compute_type(value, sampling_locations, attention_weights);
  const auto output = ms_deform_attn_cuda_forward(
      value.to(kernel_type).contiguous(), spatial_shapes.contiguous(),
      level_start_index.contiguous(), sampling_locations.to(kernel_type).contiguous(),
      attention_weights.to(kernel_type).contiguous(), static_cast<int>(channels_per_thread));
  return output.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t channels_per_thread) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
               channels_per_thread);
  check_on_device("grad_output", grad_output, value);
  check_floating("grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_locations.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must be (N, Lq, M * D), got ", shape_of(grad_output));
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto kernel_type = compute_type(value, sampling_locations, attention_weights);
  auto [grad_value, grad_locations, grad_weights] = ms_deform_attn_cuda_backward(
      value.to(kernel_type).contiguous(), spatial_shapes.contiguous(),
      level_start_index.contiguous(), sampling_locations.to(kernel_type).contiguous(),
      attention_weights.to(kernel_type).contiguous(), grad_output.to(kernel_type).contiguous(),
      static_cast<int>(channels_per_thread));
  return {grad_value.to(value.scalar_type()),
          grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace ddl_mask2former

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention CUDA kernels (ddl_mask2former.ops._C)";
  m.def("ms_deform_attn_forward", &ddl_mask2former::forward,
        "Forward -> (N, Lq, M*D). channels_per_thread: 0 = widest vector width that fits.",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"),
        py::arg("channels_per_thread") = 0);
  m.def("ms_deform_attn_backward", &ddl_mask2former::backward,
        "Backward -> (grad_value, grad_sampling_locations, grad_attention_weights).",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"),
        py::arg("channels_per_thread") = 0);
}
