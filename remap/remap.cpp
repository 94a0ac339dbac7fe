// MAE's token remapping by the masking permutation as torch.library operators (autograd is registered in
// core/custom_ops.py):
//   dinossl::gather_tokens(x, index)                  out[b, i] = x[b, index[b, i]]    (torch.gather along dim 1)
//   dinossl::scatter_add_tokens(src, index, num_tokens) out[b, index[b, i]] += src[b, i] into zeros
// each the other's backward. MAE gathers the visible tokens with ids_keep and un-shuffles the decoder's tokens with
// ids_restore. Rows are copied whole, and the scatter adds in increasing i, the order of torch's scatter_add, so both
// equal torch.gather's forward and backward exactly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include <cstring>

#include "remap.h"

namespace {

constexpr int64_t kGrainSize = 32768;  // elements per parallel task, ATen's own grain size

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_tokens(x, index, "gather_tokens");
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = index.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());
  const int64_t row_bytes = D * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ids = ic.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = ids[r];
      TORCH_CHECK(j >= 0 && j < L, "gather_tokens: index ", j, " out of range for ", L, " tokens");
      std::memcpy(dst + r * row_bytes, src + ((r / K) * L + j) * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor scatter_add_tokens_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_tokens) {
  check_tokens(src, index, "scatter_add_tokens");
  TORCH_CHECK(index.size(1) == src.size(1), "scatter_add_tokens: index has ", index.size(1), " tokens, src ",
              src.size(1));
  const at::Tensor sc = src.contiguous();
  const at::Tensor ic = index.contiguous();
  const int64_t B = src.size(0), K = src.size(1), D = src.size(2), L = num_tokens;
  // Reduced precisions accumulate in float and round once, as torch's scatter_add does for an expanded index.
  const auto acc_type = at::toOpMathType(src.scalar_type());
  at::Tensor out = at::zeros({B, L, D}, src.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_add_tokens", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = sc.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const int64_t* ids = ic.const_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(K * D, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < K; ++i) {
          const int64_t j = ids[b * K + i];
          TORCH_CHECK(j >= 0 && j < L, "scatter_add_tokens: index ", j, " out of range for ", L, " tokens");
          acc_t* row = o + (b * L + j) * D;
          const scalar_t* from = s + (b * K + i) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += static_cast<acc_t>(from[d]);
        }
      }
    });
  });
  return acc_type == src.scalar_type() ? out : out.to(src.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dinossl, m) {
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_add_tokens(Tensor src, Tensor index, int num_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(dinossl, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_add_tokens", &scatter_add_tokens_cpu);
}
