// CUDA kernel of dinossl::ema_update_ (see ema.cpp): one launch per dtype for all parameters, each block updating a
// chunk of one tensor. The rounding is that of PyTorch's foreach kernels: the product t * m rounded, then s times
// (1 - m) added in one fused multiply-add, written with explicit intrinsics so no compiler contraction changes it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

__device__ inline float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ inline double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ inline float fma_rn(float x, float y, float z) { return __fmaf_rn(x, y, z); }
__device__ inline double fma_rn(double x, double y, double z) { return __fma_rn(x, y, z); }

// chunks holds 4 int64 per block: teacher pointer, student pointer, first element, element count.
template <typename T>
__global__ void ema_kernel(const int64_t* chunks, T m, T alpha) {
  const int64_t* c = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  T* t = reinterpret_cast<T*>(c[0]) + c[2];
  const T* s = reinterpret_cast<const T*>(c[1]) + c[2];
  for (int64_t i = threadIdx.x; i < c[3]; i += blockDim.x) t[i] = fma_rn(alpha, s[i], mul_rn(t[i], m));
}

bool fast_path(const at::Tensor& t, const at::Tensor& s, at::ScalarType dtype, c10::Device device) {
  return t.device() == device && s.device() == device && t.scalar_type() == dtype && s.scalar_type() == dtype &&
         t.sizes().equals(s.sizes()) && t.is_contiguous() && s.is_contiguous() && !t.is_neg() && !t.is_conj() &&
         !s.is_neg() && !s.is_conj();
}

template <typename T>
void launch(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, double momentum, c10::Device device) {
  std::vector<int64_t> host;
  for (const auto& [t, s] : pairs) {
    for (int64_t start = 0; start < t.numel(); start += kChunk) {
      host.insert(host.end(), {reinterpret_cast<int64_t>(t.data_ptr()), reinterpret_cast<int64_t>(s.data_ptr()),
                               start, std::min(kChunk, t.numel() - start)});
    }
  }
  if (host.empty()) return;
  const auto options = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  auto pinned = at::empty({static_cast<int64_t>(host.size())}, options);
  std::copy(host.begin(), host.end(), pinned.data_ptr<int64_t>());
  auto chunks = pinned.to(device, /*non_blocking=*/true);
  const auto blocks = static_cast<unsigned int>(host.size() / 4);
  ema_kernel<T><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream(device.index())>>>(
      chunks.const_data_ptr<int64_t>(), static_cast<T>(momentum), static_cast<T>(1.0 - momentum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ema_update_cuda(at::TensorList teacher, at::TensorList student, double momentum) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_: ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  if (teacher.empty()) return;
  const c10::Device device = teacher[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<std::pair<at::Tensor, at::Tensor>> f32, f64;
  std::vector<at::Tensor> rest_t, rest_s;
  for (size_t k = 0; k < teacher.size(); ++k) {
    if (fast_path(teacher[k], student[k], at::kFloat, device)) {
      f32.emplace_back(teacher[k], student[k]);
    } else if (fast_path(teacher[k], student[k], at::kDouble, device)) {
      f64.emplace_back(teacher[k], student[k]);
    } else {
      rest_t.push_back(teacher[k]);
      rest_s.push_back(student[k]);
    }
  }
  launch<float>(f32, momentum, device);
  launch<double>(f64, momentum, device);
  if (!rest_t.empty()) {
    at::_foreach_mul_(rest_t, momentum);
    at::_foreach_add_(rest_t, rest_s, 1.0 - momentum);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dinossl, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }
