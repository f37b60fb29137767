// Fused rollout log-prob gather (docs/math.md §4) on CPU tensors:
//   forward   logp[b, t] = L[b, t, y] - logsumexp_v L[b, t, v]      (one read of each row)
//   backward  dL[b, t, :] = g[b, t] * (onehot(y) - softmax(L[b, t])) (one read, one write of each row)
// Rows are processed in chunks of kChunk logits: each chunk is loaded (and converted to the
// accumulation type when needed) once, then reduced twice while it sits in L1 (max, then sum-exp),
// and merged into the row's running max / sum-exp online. The float loops are written so gcc
// vectorises them (`omp simd` reductions, a branch-free exp), and are compiled for AVX-512, AVX2+FMA
// and baseline x86-64 with the best clone picked at load time. Masked rows cost nothing; without a mask
// (None) every row is live.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DISTREWARD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISTREWARD_SIMD_CLONES
#endif

namespace {

constexpr int64_t kChunk = 2048;  // logits per chunk: 8 KiB of fp32, stays in L1 between passes

// fp32 for fp32 / bf16 / fp16 logits, fp64 for fp64 (gradcheck).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

using distreward_cpu::exp_nonpositive;  // csrc/cpu_kernels.h

template <typename acc_t>
DISTREWARD_INLINE acc_t max_of(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename acc_t>
DISTREWARD_INLINE bool any_nan(const acc_t* x, int64_t n) {
  bool found = false;
#pragma omp simd reduction(| : found)
  for (int64_t i = 0; i < n; ++i) found |= x[i] != x[i];
  return found;
}

// sum_i exp(x_i - shift), shift >= max_i x_i.
template <typename acc_t>
DISTREWARD_INLINE acc_t sum_exp(const acc_t* x, int64_t n, acc_t shift) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_nonpositive(x[i] - shift);
  return s;
}

// Writes x to *dst in the logits' dtype as plain integer / float stores, so store loops vectorise
// (assigning a c10::BFloat16 / c10::Half object does not). bf16 rounds to nearest even, like c10.
DISTREWARD_INLINE void store_as(float x, float* dst) { *dst = x; }
DISTREWARD_INLINE void store_as(double x, double* dst) { *dst = x; }
DISTREWARD_INLINE void store_as(float x, c10::Half* dst) { dst->x = c10::Half(x).x; }
DISTREWARD_INLINE void store_as(float x, c10::BFloat16* dst) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  dst->x = x != x ? uint16_t{0x7FC0} : rounded;
}

// Logits [start, start + n) of a row as a contiguous acc_t array: the row itself when it already is
// one, else a converted (and de-strided) copy in `buf`.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
DISTREWARD_INLINE const acc_t* load_chunk(const scalar_t* row, int64_t stride, int64_t start, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return row + start;
  }
  const scalar_t* src = row + start * stride;
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i * stride]);
  }
  return buf;
}

// logsumexp of one row of `vocab` logits `row[v * stride]`; -inf for a row of -inf, NaN for a row holding
// a NaN or +inf (max_of may skip a NaN: sum_exp propagates it, and a chunk of -inf is searched for one).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
DISTREWARD_SIMD_CLONES acc_t row_logsumexp(const scalar_t* row, int64_t stride, int64_t vocab) {
  alignas(64) acc_t buf[kChunk];
  acc_t running_max = -std::numeric_limits<acc_t>::infinity();
  acc_t total = 0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const acc_t* x = load_chunk(row, stride, start, n, buf);
    const acc_t chunk_max = max_of(x, n);
    if (chunk_max == -std::numeric_limits<acc_t>::infinity()) {
      if (any_nan(x, n)) return std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    if (chunk_max > running_max) {
      total *= std::exp(running_max - chunk_max);
      running_max = chunk_max;
    }
    total += sum_exp(x, n, running_max);
  }
  return running_max + std::log(total);
}

// grad_row[v] = g * (onehot(id)[v] - exp(row[v] - lse)), written contiguously in the logits' dtype.
// grad_row may be the (contiguous) row itself: every logit is read before its gradient is written.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
DISTREWARD_SIMD_CLONES void row_grad(const scalar_t* row, int64_t stride, int64_t vocab, acc_t lse, acc_t g,
                                     int64_t id, scalar_t* grad_row) {
  alignas(64) acc_t buf[kChunk];
  const acc_t picked = static_cast<acc_t>(row[id * stride]);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const acc_t* x = load_chunk(row, stride, start, n, buf);
    scalar_t* dst = grad_row + start;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store_as(-g * exp_nonpositive(x[i] - lse), dst + i);
  }
  store_as(g - g * exp_nonpositive(picked - lse), grad_row + id);
}

// Error messages are formatted with snprintf into a fixed buffer and handed to TORCH_CHECK_* as one C
// string, so no std::ostringstream runs in this library. Under torch 2.11 + Python 3.12 (issue 10) the
// checks whose messages formatted integers or sizes through c10::str (iostream numeric facets inlined
// into this .so) crashed the process while those formatting only strings raised: the likely cause,
// not reproduced here (torch 2.13 raises either way).
class Message {
 public:
  template <typename... Args>
  explicit Message(const char* format, Args... args) {
    std::snprintf(text_, sizeof(text_), format, args...);
  }
  const char* c_str() const { return text_; }

 private:
  char text_[320];
};

// "[2, 3, 11]" for the messages.
class Shape {
 public:
  explicit Shape(at::IntArrayRef sizes) {
    int used = std::snprintf(text_, sizeof(text_), "[");
    for (size_t i = 0; i < sizes.size() && used < static_cast<int>(sizeof(text_)); ++i) {
      used += std::snprintf(text_ + used, sizeof(text_) - used, i ? ", %lld" : "%lld", static_cast<long long>(sizes[i]));
    }
    if (used < static_cast<int>(sizeof(text_))) std::snprintf(text_ + used, sizeof(text_) - used, "]");
  }
  const char* c_str() const { return text_; }

 private:
  char text_[96];
};

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The mask, when given, contiguous (the kernels read it as a flat bool array); none: every row is live.
using OptionalMask = c10::optional<at::Tensor>;

OptionalMask contiguous_mask(const OptionalMask& mask) {
  return mask.has_value() ? OptionalMask(mask->contiguous()) : c10::nullopt;
}

const bool* live_rows(const OptionalMask& mask) { return mask.has_value() ? mask->const_data_ptr<bool>() : nullptr; }

DISTREWARD_INLINE bool is_live(const bool* live, int64_t r) { return live == nullptr || live[r]; }

// Shapes, dtypes and devices the kernels rely on (ValueError), then ids at live positions in [0, V)
// (IndexError). Everything is checked here, before any OpenMP region: nothing inside one throws.
void check_inputs(const at::Tensor& logits, const at::Tensor& ids, const OptionalMask& mask) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && ids.device().is_cpu() && (!mask || mask->device().is_cpu()),
                    "gather_logprobs (C++): logits, ids and mask must be CPU tensors");
  TORCH_CHECK_VALUE(logits.dim() == 3, Message("gather_logprobs (C++): logits must be [B, T, V], got shape %s",
                                               Shape(logits.sizes()).c_str()).c_str());
  TORCH_CHECK_VALUE(is_float_dtype(logits.scalar_type()),
                    "gather_logprobs (C++): logits must be float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(ids.sizes() == logits.sizes().slice(0, 2),
                    Message("gather_logprobs (C++): ids must be [B, T] = %s, got %s",
                            Shape(logits.sizes().slice(0, 2)).c_str(), Shape(ids.sizes()).c_str()).c_str());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong, "gather_logprobs (C++): ids must be int64");
  TORCH_CHECK_VALUE(!mask || (mask->sizes() == ids.sizes() && mask->scalar_type() == at::kBool),
                    Message("gather_logprobs (C++): mask must be a bool tensor of shape %s",
                            Shape(ids.sizes()).c_str()).c_str());
  TORCH_CHECK_VALUE(logits.size(2) > 0, "gather_logprobs (C++): logits must have a non-empty vocabulary");
}

// ids contiguous [B, T], live the mask's rows (nullptr: all); raises IndexError naming the first live id
// outside [0, vocab).
void check_ids_in_vocab(const at::Tensor& ids, const bool* live, int64_t vocab) {
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t steps = ids.size(1);
  for (int64_t r = 0; r < ids.numel(); ++r) {
    TORCH_CHECK_INDEX(!is_live(live, r) || (id[r] >= 0 && id[r] < vocab),
                      Message("ids[%lld, %lld] = %lld is outside the vocabulary [0, %lld)",
                              static_cast<long long>(r / steps), static_cast<long long>(r % steps),
                              static_cast<long long>(id[r]), static_cast<long long>(vocab)).c_str());
  }
}

// A NaN or +inf logit makes its row's logsumexp NaN, a row of only -inf makes it -inf: one pass over the
// [B, T] output finds every such live row (ValueError naming the first), instead of a pass over [B, T, V].
template <typename acc_t>
void check_rows_finite(const acc_t* lse, const bool* live, int64_t rows, int64_t steps) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(!is_live(live, r) || std::isfinite(lse[r]),
                      Message("logits[%lld, %lld] contains NaN or +inf, or no finite value (a live row must hold "
                              "a distribution)", static_cast<long long>(r / steps),
                              static_cast<long long>(r % steps)).c_str());
  }
}

using distreward_cpu::advise_huge_pages;  // csrc/cpu_kernels.h

// Calls fn(row_index, row_pointer) for every row, OpenMP-parallel from kParallelLogits logits on (below
// that, waking the other threads costs more than the work, and far more on a loaded machine). fn must not throw.
constexpr int64_t kParallelLogits = 1 << 16;

template <typename scalar_t, typename Fn>
void for_each_row(const at::Tensor& logits, Fn fn) {
  const int64_t rows = logits.size(0) * logits.size(1);
  const int64_t steps = logits.size(1);
  const int64_t stride_b = logits.stride(0), stride_t = logits.stride(1);
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
#pragma omp parallel for schedule(dynamic, 8) if (rows * logits.size(2) >= kParallelLogits)
  for (int64_t r = 0; r < rows; ++r) fn(r, data + (r / steps) * stride_b + (r % steps) * stride_t);
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad_logp [B, T] and the forward's lse [B, T] -> grad_logits [B, T, V] written contiguously into `grad`.
void backward_into(const at::Tensor& grad_logp_in, const at::Tensor& logits, const at::Tensor& ids_in,
                   const OptionalMask& mask_in, const at::Tensor& lse_in, at::Tensor& grad) {
  check_inputs(logits, ids_in, mask_in);
  const auto acc = acc_dtype(logits);
  TORCH_CHECK_VALUE(grad_logp_in.device().is_cpu() && lse_in.device().is_cpu(),
                    "gather_logprobs_backward (C++): grad_logp and lse must be CPU tensors");
  TORCH_CHECK_VALUE(grad_logp_in.sizes() == ids_in.sizes() && lse_in.sizes() == ids_in.sizes(),
                    Message("gather_logprobs_backward (C++): grad_logp and lse must be [B, T] = %s",
                            Shape(ids_in.sizes()).c_str()).c_str());
  TORCH_CHECK_VALUE(is_float_dtype(grad_logp_in.scalar_type()),
                    "gather_logprobs_backward (C++): grad_logp must be a float tensor");
  TORCH_CHECK_VALUE(lse_in.scalar_type() == acc,
                    "gather_logprobs_backward (C++): lse must be float32 (float64 for float64 logits)");
  const auto ids = ids_in.contiguous(), lse = lse_in.contiguous();
  const auto mask = contiguous_mask(mask_in);
  const bool* live = live_rows(mask);
  const auto grad_logp = grad_logp_in.to(acc).contiguous();
  const int64_t vocab = logits.size(2), stride_v = logits.stride(2);
  check_ids_in_vocab(ids, live, vocab);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gather_logprobs_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t* id = ids.const_data_ptr<int64_t>();
    const acc_t* g = grad_logp.const_data_ptr<acc_t>();
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    scalar_t* grad_data = grad.data_ptr<scalar_t>();
    for_each_row<scalar_t>(logits, [&](int64_t r, const scalar_t* row) {
      scalar_t* grad_row = grad_data + r * vocab;
      if (is_live(live, r)) {
        row_grad(row, stride_v, vocab, row_lse[r], g[r], id[r], grad_row);
      } else {
        std::memset(grad_row, 0, vocab * sizeof(scalar_t));  // all-zero bits: +0 in every float dtype
      }
    });
  });
}

// logits [B, T, V] fp32/bf16/fp16/fp64 (any strides), ids [B, T] int64, mask [B, T] bool or None
// -> (logp [B, T], lse [B, T]), fp32 (fp64 for fp64 logits), both 0 where mask is false.
std::tuple<at::Tensor, at::Tensor> gather_logprobs_forward(const at::Tensor& logits, const at::Tensor& ids_in,
                                                           const OptionalMask& mask_in) {
  check_inputs(logits, ids_in, mask_in);
  const auto ids = ids_in.contiguous();
  const auto mask = contiguous_mask(mask_in);
  const bool* live = live_rows(mask);
  const int64_t vocab = logits.size(2), stride_v = logits.stride(2);
  check_ids_in_vocab(ids, live, vocab);
  auto logp = at::empty(ids.sizes(), logits.options().dtype(acc_dtype(logits)));
  auto lse = at::empty_like(logp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gather_logprobs_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t* id = ids.const_data_ptr<int64_t>();
    acc_t* logp_out = logp.data_ptr<acc_t>();
    acc_t* lse_out = lse.data_ptr<acc_t>();
    for_each_row<scalar_t>(logits, [&](int64_t r, const scalar_t* row) {
      if (!is_live(live, r)) {
        logp_out[r] = lse_out[r] = 0;
        return;
      }
      lse_out[r] = row_logsumexp(row, stride_v, vocab);
      logp_out[r] = static_cast<acc_t>(row[id[r] * stride_v]) - lse_out[r];
    });
    check_rows_finite(lse_out, live, lse.numel(), ids.size(1));
  });
  return {logp, lse};
}

// -> grad_logits [B, T, V] = grad_logp * (onehot(ids) - softmax(logits)), contiguous, in the logits' dtype;
// 0 on masked rows.
at::Tensor gather_logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& ids,
                                    const OptionalMask& mask, const at::Tensor& lse) {
  check_inputs(logits, ids, mask);
  auto grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  backward_into(grad_logp, logits, ids, mask, lse, grad);
  return grad;
}

// The same gradient written over the (contiguous) logits themselves: each chunk is read before it is written.
void gather_logprobs_backward_(const at::Tensor& grad_logp, at::Tensor& logits, const at::Tensor& ids,
                               const OptionalMask& mask, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "gather_logprobs_backward_ (C++): the logits must be contiguous");
  backward_into(grad_logp, logits, ids, mask, lse, logits);
}

}  // namespace

// Loaded with distreward._C (csrc/extension.cpp); called as torch.ops.distreward.* (distreward/ops/cpp.py).
TORCH_LIBRARY(distreward, m) {
  m.def("gather_logprobs_forward(Tensor logits, Tensor ids, Tensor? mask) -> (Tensor, Tensor)");
  m.def("gather_logprobs_backward(Tensor grad_logp, Tensor logits, Tensor ids, Tensor? mask, Tensor lse) -> Tensor");
  m.def("gather_logprobs_backward_(Tensor grad_logp, Tensor(a!) logits, Tensor ids, Tensor? mask, Tensor lse) -> ()");
}

TORCH_LIBRARY_IMPL(distreward, CPU, m) {
  m.impl("gather_logprobs_forward", &gather_logprobs_forward);
  m.impl("gather_logprobs_backward", &gather_logprobs_backward);
  m.impl("gather_logprobs_backward_", &gather_logprobs_backward_);
}
