// dinossl::ema_update_: the DINO teacher update t = m * t + (1 - m) * s over every parameter in one call.
//
// Bit-exact with torch._foreach_mul_(t, m) followed by torch._foreach_add_(t, s, alpha=1 - m): the product t * m is
// rounded to the tensor's dtype, then s * (1 - m) is added with one rounding (a fused multiply-add) wherever
// PyTorch's own add kernel fuses it, which is every x86 CPU capability but DEFAULT and every other architecture.
// Tensors the fused loop does not cover (other dtypes, non-contiguous, other devices) go through those two foreach
// calls, so the result never depends on which path ran.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainSize = 32768;  // elements per parallel task, ATen's own grain size

#if defined(__x86_64__) || defined(_M_X64)
#define FMA_TARGET __attribute__((target("avx2,fma")))
bool add_is_fused() {
  static const bool fused = at::get_cpu_capability() != "DEFAULT";
  return fused;
}
#else
#define FMA_TARGET
bool add_is_fused() { return true; }
#endif

template <typename T>
FMA_TARGET void ema_fused(T* t, const T* s, int64_t n, T m, T alpha) {
  for (int64_t i = 0; i < n; ++i) t[i] = std::fma(alpha, s[i], t[i] * m);
}

template <typename T>
void ema_unfused(T* t, const T* s, int64_t n, T m, T alpha) {
  for (int64_t i = 0; i < n; ++i) {
    const T scaled = t[i] * m;
    const T step = alpha * s[i];
    t[i] = scaled + step;
  }
}

bool fast_path(const at::Tensor& t, const at::Tensor& s) {
  return t.device().is_cpu() && s.device().is_cpu() && t.scalar_type() == s.scalar_type() &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.sizes().equals(s.sizes()) &&
         t.is_contiguous() && s.is_contiguous() && !t.is_neg() && !t.is_conj() && !s.is_neg() && !s.is_conj();
}

// A piece of at most kGrainSize elements of one teacher/student pair.
template <typename T>
struct Span {
  T* t;
  const T* s;
  int64_t n;
};

template <typename T>
void add_spans(std::vector<Span<T>>& spans, const at::Tensor& t, const at::Tensor& s) {
  T* tp = t.data_ptr<T>();
  const T* sp = s.const_data_ptr<T>();
  for (int64_t start = 0; start < t.numel(); start += kGrainSize) {
    spans.push_back({tp + start, sp + start, std::min(kGrainSize, t.numel() - start)});
  }
}

// All spans in one parallel region: one fork-join per update rather than one per parameter.
template <typename T>
void update_spans(const std::vector<Span<T>>& spans, double momentum) {
  const bool fused = add_is_fused();
  const auto m = static_cast<T>(momentum);
  const auto alpha = static_cast<T>(1.0 - momentum);
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (fused) {
        ema_fused(spans[k].t, spans[k].s, spans[k].n, m, alpha);
      } else {
        ema_unfused(spans[k].t, spans[k].s, spans[k].n, m, alpha);
      }
    }
  });
}

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double momentum) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_: ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  std::vector<Span<float>> f32;
  std::vector<Span<double>> f64;
  std::vector<at::Tensor> rest_t, rest_s;
  for (size_t k = 0; k < teacher.size(); ++k) {
    const at::Tensor& t = teacher[k];
    const at::Tensor& s = student[k];
    if (!fast_path(t, s)) {
      rest_t.push_back(t);
      rest_s.push_back(s);
    } else if (t.scalar_type() == at::kFloat) {
      add_spans(f32, t, s);
    } else {
      add_spans(f64, t, s);
    }
  }
  update_spans(f32, momentum);
  update_spans(f64, momentum);
  if (!rest_t.empty()) {
    at::_foreach_mul_(rest_t, momentum);
    at::_foreach_add_(rest_t, rest_s, 1.0 - momentum);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dinossl, m) {
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(dinossl, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }
