// CUDA kernels of dinossl::gather_tokens and dinossl::scatter_add_tokens (see remap.cpp): one thread per element;
// the scatter adds atomically, which is exact for MAE's permutations (every target row receives one row).
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "remap.h"

namespace {

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535));
}

template <typename T>
__global__ void gather_kernel(const T* x, const int64_t* ids, T* out, int64_t K, int64_t L, int64_t D, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / D;
    const int64_t j = ids[r];
    CUDA_KERNEL_ASSERT(j >= 0 && j < L);
    out[e] = x[((r / K) * L + j) * D + e % D];
  }
}

template <typename T>
__global__ void scatter_add_kernel(const T* src, const int64_t* ids, T* out, int64_t K, int64_t L, int64_t D,
                                   int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / D;
    const int64_t j = ids[r];
    CUDA_KERNEL_ASSERT(j >= 0 && j < L);
    gpuAtomicAdd(out + ((r / K) * L + j) * D + e % D, src[e]);
  }
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_tokens(x, index, "gather_tokens");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = index.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "gather_tokens", [&] {
    gather_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), ic.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), K, L, D,
        out.numel());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_add_tokens_cuda(const at::Tensor& src, const at::Tensor& index, int64_t num_tokens) {
  check_tokens(src, index, "scatter_add_tokens");
  TORCH_CHECK(index.size(1) == src.size(1), "scatter_add_tokens: index has ", index.size(1), " tokens, src ",
              src.size(1));
  c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor sc = src.contiguous();
  const at::Tensor ic = index.contiguous();
  const int64_t B = src.size(0), K = src.size(1), D = src.size(2);
  at::Tensor out = at::zeros({B, num_tokens, D}, src.options());
  if (sc.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_add_tokens", [&] {
    scatter_add_kernel<scalar_t><<<blocks_for(sc.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sc.const_data_ptr<scalar_t>(), ic.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), K,
        num_tokens, D, sc.numel());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dinossl, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_add_tokens", &scatter_add_tokens_cuda);
}
