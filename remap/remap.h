// Argument checks shared by the CPU and CUDA kernels of the token remapping operators.
#pragma once
#include <ATen/core/Tensor.h>

inline void check_tokens(const at::Tensor& tokens, const at::Tensor& index, const char* op) {
  TORCH_CHECK(tokens.dim() == 3, op, ": tokens must be (batch, tokens, dim), got ", tokens.sizes());
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong, op,
              ": index must be a (batch, tokens) int64 tensor, got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(index.size(0) == tokens.size(0), op, ": index has batch ", index.size(0), ", tokens ", tokens.size(0));
  TORCH_CHECK(index.device() == tokens.device(), op, ": index on ", index.device(), ", tokens on ", tokens.device());
}
