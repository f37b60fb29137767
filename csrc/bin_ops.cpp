// Fused bin ops of the distributional head (docs/math.md §1-3) on CPU tensors, one pass over the rows:
//   bin_moments_forward / _backward       (mean, std) [N] of softmax(logits [N, K]) over the centers
//   bin_gaussian_kl_forward / _backward   KL(q || softmax(logits)) [N], q Gaussian around a target [N] of
//                                         width sigma (a number or per-row [N]) or given as q [N, K]
//   bin_pair_loss_forward / _backward     the mean pair loss (bt_mean, bt_kl, dpl); the forward also writes
//                                         the gradient of the mean loss (when asked), the backward scales it
// Each row of K logits (any strides, fp32 / bf16 / fp16 / fp64) is loaded once into a small buffer in the
// accumulation type (fp32, fp64 for fp64) and every quantity of the row is computed from it. Rows are
// cut into blocks of kBlockRows, OpenMP-parallel over blocks with a static schedule; a reduction (the
// pair loss) sums each block in row order and then the block sums in block order, so results do not
// depend on the thread count. A bad row (NaN / +inf logits, a row of -inf, a target outside [0, 1], a
// bad label distribution or width, non-finite centers) gets NaN results, as in the eager reference
// (distreward/ops/reference.py); with `validate` the op raises ValueError ("non-finite result") when a
// result is not finite, found while writing it (no extra pass). Meta implementations and the autograd
// formulas are registered in Python (distreward/ops/cpp_bins.py), as for the gather in logprobs.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using distreward_cpu::advise_huge_pages;
using distreward_cpu::exp_nonpositive;
using distreward_cpu::log1p_nonnegative;
using distreward_cpu::log_nonnegative;

constexpr int64_t kBlockRows = 256;       // rows per block: the unit of work and of the loss's partial sums
constexpr int64_t kParallelWork = 1 << 15;  // logits below which one thread runs everything
constexpr double kLabelSumTolerance = 1e-3;  // reference.LABEL_SUM_TOLERANCE
constexpr const char* kBadValues = "non-finite result";  // distreward/ops/cpp_bins.py matches this text

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows [N, K] of logits with their strides.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t row_stride, bin_stride;
  explicit Rows(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), row_stride(t.stride(0)), bin_stride(t.stride(1)) {}
};

// The kernels work on tiles of kLanes rows held transposed, x[k * kLanes + l] for bin k of the tile's row l,
// so every loop over a tile's bins is a vector operation across its rows (no horizontal reductions, any K).
// Lanes past the last row hold zeros; their results are never written or added.
constexpr int64_t kLanes = 16;
#define DISTREWARD_LANES _Pragma("omp simd") for (int64_t l = 0; l < kLanes; ++l)

// Rows [r0, r0 + n) of `z` into the tile x, in acc_t.
template <typename scalar_t, typename acc_t>
DISTREWARD_INLINE void load_tile(const scalar_t* data, int64_t row_stride, int64_t bin_stride, int64_t r0, int64_t n,
                                 int64_t bins, acc_t* x) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const scalar_t* row = data + (r0 + std::min(l, n - 1)) * row_stride;  // past n: any valid row, then zeroed
    for (int64_t k = 0; k < bins; ++k) x[k * kLanes + l] = l < n ? static_cast<acc_t>(row[k * bin_stride]) : acc_t(0);
  }
}

// Softmax of a tile in place: x (the logits) becomes log p, p gets p. NaN / +inf logits or a row of -inf make
// the row NaN (the max skips a NaN, exp(NaN - m) brings it back; inf - inf is NaN).
template <typename acc_t>
DISTREWARD_INLINE void log_softmax_tile(acc_t* x, acc_t* p, int64_t bins) {
  acc_t m[kLanes], total[kLanes], log_total[kLanes];
  DISTREWARD_LANES { m[l] = -kInf<acc_t>; total[l] = 0; }
  for (int64_t k = 0; k < bins; ++k) {
    const acc_t* xk = x + k * kLanes;
    DISTREWARD_LANES m[l] = xk[l] > m[l] ? xk[l] : m[l];
  }
  for (int64_t k = 0; k < bins; ++k) {
    acc_t *xk = x + k * kLanes, *pk = p + k * kLanes;
    DISTREWARD_LANES {
      xk[l] -= m[l];
      pk[l] = exp_nonpositive(xk[l]);
      total[l] += pk[l];
    }
  }
  DISTREWARD_LANES log_total[l] = log_nonnegative(total[l]);
  DISTREWARD_LANES total[l] = acc_t(1) / total[l];
  for (int64_t k = 0; k < bins; ++k) {
    acc_t *xk = x + k * kLanes, *pk = p + k * kLanes;
    DISTREWARD_LANES {
      xk[l] -= log_total[l];
      pk[l] *= total[l];
    }
  }
}

// Mean and variance [kLanes] of the centers under the tile p.
template <typename acc_t>
DISTREWARD_INLINE void moments_tile(const acc_t* p, const acc_t* c, int64_t bins, acc_t* mean, acc_t* var) {
  DISTREWARD_LANES { mean[l] = 0; var[l] = 0; }
  for (int64_t k = 0; k < bins; ++k) {
    const acc_t* pk = p + k * kLanes;
    DISTREWARD_LANES mean[l] += pk[l] * c[k];
  }
  for (int64_t k = 0; k < bins; ++k) {
    const acc_t* pk = p + k * kLanes;
    DISTREWARD_LANES var[l] += pk[l] * (c[k] - mean[l]) * (c[k] - mean[l]);
  }
}

// A side's labels (docs/math.md §2): none, label means [N] with a width (scalar or per-row [N]), or label
// distributions [N, K]; every tensor contiguous in acc_t.
template <typename acc_t>
struct Labels {
  const acc_t* target = nullptr;  // nullptr: no labels
  bool given = false;             // target is q [N, K]
  const acc_t* row_sigma = nullptr;
  acc_t sigma = 0;
};

// log q and q (tiles) of rows [r0, r0 + n)'s label distributions; NaN over a bad row (as
// reference.label_log_probs: a target outside [0, 1], a width not positive and finite, non-finite centers; a
// given q with a negative or non-finite entry or a sum off 1 by more than the tolerance).
template <typename acc_t>
DISTREWARD_INLINE void label_tile(const Labels<acc_t>& labels, int64_t r0, int64_t n, const acc_t* c,
                                  bool centers_finite, int64_t bins, acc_t* log_q, acc_t* q) {
  acc_t usable[kLanes], total[kLanes];  // usable: 1 or 0
  DISTREWARD_LANES { usable[l] = 1; total[l] = 0; }
  if (labels.given) {
    load_tile(labels.target, bins, int64_t(1), r0, n, bins, q);
    for (int64_t k = 0; k < bins; ++k) {
      const acc_t* qk = q + k * kLanes;
      DISTREWARD_LANES {
        usable[l] = qk[l] >= 0 && qk[l] <= std::numeric_limits<acc_t>::max() ? usable[l] : acc_t(0);
        total[l] += qk[l];
      }
    }
    for (int64_t i = 0; i < bins * kLanes; ++i) log_q[i] = log_nonnegative(q[i]);
    DISTREWARD_LANES usable[l] = std::abs(total[l] - 1) <= acc_t(kLabelSumTolerance) ? usable[l] : acc_t(0);
  } else {
    acc_t t[kLanes], scale[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t r = r0 + std::min(l, n - 1);
      t[l] = labels.target[r];
      const acc_t s = labels.row_sigma ? labels.row_sigma[r] : labels.sigma;
      usable[l] = t[l] >= 0 && t[l] <= 1 && s > 0 && s <= std::numeric_limits<acc_t>::max() && centers_finite ? 1 : 0;
      scale[l] = acc_t(-0.5) / (s * s);
    }
    for (int64_t k = 0; k < bins; ++k) {
      acc_t* log_qk = log_q + k * kLanes;
      DISTREWARD_LANES log_qk[l] = (c[k] - t[l]) * (c[k] - t[l]) * scale[l];
    }
    log_softmax_tile(log_q, q, bins);  // the Gaussian label: softmax over the bins of -(c_k - t)^2 / (2 sigma^2)
  }
  for (int64_t k = 0; k < bins; ++k) {
    acc_t *log_qk = log_q + k * kLanes, *qk = q + k * kLanes;
    DISTREWARD_LANES {
      log_qk[l] = usable[l] != 0 ? log_qk[l] : kNaN<acc_t>;
      qk[l] = usable[l] != 0 ? qk[l] : kNaN<acc_t>;
    }
  }
}

// KL(q || p) [kLanes] of a tile, q_k = 0 terms counting 0, and sum_k q_k [kLanes].
template <typename acc_t>
DISTREWARD_INLINE void kl_tile(const acc_t* log_q, const acc_t* q, const acc_t* log_p, int64_t bins, acc_t* kl,
                               acc_t* q_sum) {
  DISTREWARD_LANES { kl[l] = 0; q_sum[l] = 0; }
  for (int64_t k = 0; k < bins; ++k) {
    const acc_t *log_qk = log_q + k * kLanes, *qk = q + k * kLanes, *log_pk = log_p + k * kLanes;
    DISTREWARD_LANES {
      kl[l] += qk[l] != 0 ? qk[l] * (log_qk[l] - log_pk[l]) : acc_t(0);
      q_sum[l] += qk[l];
    }
  }
}

// Writes a gradient tile (lanes < n) to rows [r0, r0 + n) of a contiguous [N, K] output.
template <typename acc_t, typename out_t>
DISTREWARD_INLINE void store_tile(const acc_t* g, int64_t r0, int64_t n, int64_t bins, out_t* out) {
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t k = 0; k < bins; ++k) out[(r0 + l) * bins + k] = static_cast<out_t>(g[k * kLanes + l]);
  }
}

// log(exp(x) + exp(y)), exact for -inf operands.
template <typename acc_t>
inline acc_t log_add_exp(acc_t x, acc_t y) {
  if (x == -kInf<acc_t>) return y;
  if (y == -kInf<acc_t>) return x;
  const acc_t m = std::max(x, y);
  return m + std::log1p(exp_nonpositive(-std::abs(x - y)));
}

// dpl (docs/math.md §3) of one row in log space, for rows whose A underflows in the tile's linear-space sum:
// returns log A, A = sum_i p_i w_i, w_i = sum_{j<i} r_j + r_i / 2; with `grad`, writes d(-log A)/dz times scale
// for both sides (column stride kLanes, as in a tile).
template <typename acc_t>
acc_t dpl_row_log_space(const acc_t* log_p, const acc_t* log_r, int64_t bins, acc_t scale, acc_t* grad_p,
                        acc_t* grad_r) {
  const acc_t log_half = std::log(acc_t(0.5));
  std::vector<acc_t> w(bins), u(bins);
  acc_t prefix = -kInf<acc_t>, log_a = -kInf<acc_t>, suffix = -kInf<acc_t>;
  for (int64_t i = 0; i < bins; ++i) {
    w[i] = log_add_exp(prefix, log_r[i * kLanes] + log_half);
    prefix = log_add_exp(prefix, log_r[i * kLanes]);
    log_a = log_add_exp(log_a, log_p[i * kLanes] + w[i]);
  }
  if (grad_p) {
    for (int64_t j = bins - 1; j >= 0; --j) {
      u[j] = log_add_exp(suffix, log_p[j * kLanes] + log_half);
      suffix = log_add_exp(suffix, log_p[j * kLanes]);
    }
    for (int64_t k = 0; k < bins; ++k) {
      grad_p[k * kLanes] = scale * (std::exp(log_p[k * kLanes]) - std::exp(log_p[k * kLanes] + w[k] - log_a));
      grad_r[k * kLanes] = scale * (std::exp(log_r[k * kLanes]) - std::exp(log_r[k * kLanes] + u[k] - log_a));
    }
  }
  return log_a;
}

inline bool parallel(int64_t rows, int64_t bins) { return rows * bins >= kParallelWork; }

// fn(block, begin, end) for every block of kBlockRows rows, a static schedule over blocks; returns whether any
// call returned true (a non-finite result). fn must not throw.
template <typename Fn>
bool for_each_block(int64_t rows, int64_t bins, Fn fn) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(| : bad) if (parallel(rows, bins))
  for (int64_t b = 0; b < blocks; ++b) bad |= fn(b, b * kBlockRows, std::min(rows, (b + 1) * kBlockRows));
  return bad;
}

void raise_bad_values(const char* op) {
  TORCH_CHECK_VALUE(false, (std::string(op) + ": " + kBadValues + " (bad input values)").c_str());
}

// ---- checks (metadata only; the public ops check the same on the host first) ----

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), (std::string(op) + ": the tensors must be on the CPU").c_str());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 2,
                    (std::string(op) + ": logits must be [N, K] with K >= 2").c_str());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    (std::string(op) + ": logits must be float32, float64, float16 or bfloat16").c_str());
}

// `t` as a contiguous acc tensor of `numel` entries on the CPU.
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc, int64_t numel, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_floating_point() && t.numel() == numel,
                    (std::string(what) + " must be a float CPU tensor of " + std::to_string(numel) + " entries")
                        .c_str());
  return t.to(acc).contiguous();
}

// A side's Labels from target ([N] or [N, K], or none) and sigma (per-row tensor [N] or the number); `keep`
// holds the converted tensors alive.
template <typename acc_t>
Labels<acc_t> make_labels(const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& row_sigma,
                          double sigma, int64_t rows, int64_t bins, std::vector<at::Tensor>& keep) {
  Labels<acc_t> labels;
  if (!target.has_value()) return labels;
  const auto acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  labels.given = target->dim() == 2;
  TORCH_CHECK_VALUE(target->dim() == 1 || (target->dim() == 2 && target->size(1) == bins),
                    "bin ops (C++): a target must be label means [N] or label distributions [N, K]");
  keep.push_back(as_acc(*target, acc, labels.given ? rows * bins : rows, "target"));
  labels.target = keep.back().const_data_ptr<acc_t>();
  if (row_sigma.has_value() && !labels.given) {
    keep.push_back(as_acc(*row_sigma, acc, rows, "sigma"));
    labels.row_sigma = keep.back().const_data_ptr<acc_t>();
  }
  labels.sigma = static_cast<acc_t>(sigma);
  return labels;
}

template <typename acc_t>
bool all_finite(const acc_t* c, int64_t bins) {
  for (int64_t k = 0; k < bins; ++k) {
    if (!std::isfinite(c[k])) return false;
  }
  return true;
}

// ---- dist_moments ----

// Per block of rows [begin, end): mean and std, or (grads given) the gradient of
// grad_mean . mean + grad_std . std = grad_mean p (c - E) + grad_std p ((c - E)^2 - var) / (2 std), an absent
// upstream gradient counting 0 and std = 0 having gradient 0. Returns whether a result is not finite.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
bool moments_block(const Rows<scalar_t>& z, const acc_t* c, int64_t bins, int64_t begin, int64_t end, acc_t* mean_out,
                   acc_t* std_out, const acc_t* grad_mean, const acc_t* grad_std, scalar_t* grad) {
  std::vector<acc_t> buf(2 * bins * kLanes);
  acc_t *log_p = buf.data(), *p = log_p + bins * kLanes;
  acc_t mean[kLanes], var[kLanes], gm[kLanes], gv[kLanes];
  bool bad = false;
  for (int64_t r0 = begin; r0 < end; r0 += kLanes) {
    const int64_t n = std::min(kLanes, end - r0);
    load_tile(z.data, z.row_stride, z.bin_stride, r0, n, bins, log_p);
    log_softmax_tile(log_p, p, bins);
    moments_tile(p, c, bins, mean, var);
    if (!grad) {
      for (int64_t l = 0; l < n; ++l) {
        mean_out[r0 + l] = mean[l];
        std_out[r0 + l] = var[l] > 0 ? std::sqrt(var[l]) : acc_t(0);
        bad |= !std::isfinite(mean[l]) || !std::isfinite(std_out[r0 + l]);
      }
      continue;
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t r = r0 + std::min(l, n - 1);
      gm[l] = grad_mean ? grad_mean[r] : acc_t(0);
      gv[l] = grad_std && var[l] > 0 ? grad_std[r] / (2 * std::sqrt(var[l])) : acc_t(0);
    }
    for (int64_t k = 0; k < bins; ++k) {
      acc_t* pk = p + k * kLanes;  // becomes the gradient
      DISTREWARD_LANES {
        const acc_t d = c[k] - mean[l];
        pk[l] *= gm[l] * d + gv[l] * (d * d - var[l]);
      }
    }
    store_tile(p, r0, n, bins, grad);
  }
  return bad;
}

std::tuple<at::Tensor, at::Tensor> bin_moments_forward(const at::Tensor& logits, const at::Tensor& centers_in,
                                                       bool validate) {
  check_logits(logits, "dist_moments (C++)");
  const int64_t rows = logits.size(0), bins = logits.size(1);
  const auto acc = acc_dtype(logits);
  const auto centers = as_acc(centers_in, acc, bins, "centers");
  auto mean = at::empty({rows}, logits.options().dtype(acc));
  auto std_out = at::empty({rows}, logits.options().dtype(acc));
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bin_moments_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const Rows<scalar_t> z(logits);
    const acc_t* c = centers.const_data_ptr<acc_t>();
    acc_t *mean_data = mean.data_ptr<acc_t>(), *std_data = std_out.data_ptr<acc_t>();
    bad = for_each_block(rows, bins, [&](int64_t, int64_t begin, int64_t end) {
      return moments_block<scalar_t, acc_t>(z, c, bins, begin, end, mean_data, std_data, nullptr, nullptr, nullptr);
    });
  });
  if (validate && bad) raise_bad_values("dist_moments (C++)");
  return {mean, std_out};
}

// -> grad_logits [N, K] (logits' dtype, contiguous).
at::Tensor bin_moments_backward(const c10::optional<at::Tensor>& grad_mean_in,
                                const c10::optional<at::Tensor>& grad_std_in, const at::Tensor& logits,
                                const at::Tensor& centers_in) {
  check_logits(logits, "dist_moments backward (C++)");
  const int64_t rows = logits.size(0), bins = logits.size(1);
  const auto acc = acc_dtype(logits);
  const auto centers = as_acc(centers_in, acc, bins, "centers");
  std::vector<at::Tensor> keep;
  for (const auto* grad : {&grad_mean_in, &grad_std_in}) {
    keep.push_back(grad->has_value() ? as_acc(**grad, acc, rows, "grad") : at::Tensor());
  }
  auto grad = at::empty({rows, bins}, logits.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bin_moments_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const Rows<scalar_t> z(logits);
    const acc_t* c = centers.const_data_ptr<acc_t>();
    const acc_t* g_mean = keep[0].defined() ? keep[0].const_data_ptr<acc_t>() : nullptr;
    const acc_t* g_std = keep[1].defined() ? keep[1].const_data_ptr<acc_t>() : nullptr;
    scalar_t* out = grad.data_ptr<scalar_t>();
    for_each_block(rows, bins, [&](int64_t, int64_t begin, int64_t end) {
      return moments_block<scalar_t, acc_t>(z, c, bins, begin, end, nullptr, nullptr, g_mean, g_std, out);
    });
  });
  return grad;
}

// ---- gaussian_kl ----

// Per block of rows [begin, end): KL(q || p) into kl_out, or (grad_kl given) its gradient
// grad_kl (p sum(q) - q) into grad. Returns whether a result is not finite.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
bool kl_block(const Rows<scalar_t>& z, const Labels<acc_t>& labels, const acc_t* c, bool centers_finite, int64_t bins,
              int64_t begin, int64_t end, acc_t* kl_out, const acc_t* grad_kl, scalar_t* grad) {
  std::vector<acc_t> buf(4 * bins * kLanes);
  acc_t *log_p = buf.data(), *p = log_p + bins * kLanes, *log_q = p + bins * kLanes, *q = log_q + bins * kLanes;
  acc_t kl[kLanes], q_sum[kLanes], g[kLanes];
  bool bad = false;
  for (int64_t r0 = begin; r0 < end; r0 += kLanes) {
    const int64_t n = std::min(kLanes, end - r0);
    load_tile(z.data, z.row_stride, z.bin_stride, r0, n, bins, log_p);
    log_softmax_tile(log_p, p, bins);
    label_tile(labels, r0, n, c, centers_finite, bins, log_q, q);
    kl_tile(log_q, q, log_p, bins, kl, q_sum);
    if (!grad) {
      for (int64_t l = 0; l < n; ++l) {
        kl_out[r0 + l] = kl[l];
        bad |= !std::isfinite(kl[l]);
      }
      continue;
    }
    for (int64_t l = 0; l < kLanes; ++l) g[l] = grad_kl[r0 + std::min(l, n - 1)];
    for (int64_t k = 0; k < bins; ++k) {
      acc_t *pk = p + k * kLanes, *qk = q + k * kLanes;
      DISTREWARD_LANES pk[l] = g[l] * (pk[l] * q_sum[l] - qk[l]);
    }
    store_tile(p, r0, n, bins, grad);
  }
  return bad;
}

at::Tensor bin_gaussian_kl_forward(const at::Tensor& logits, const at::Tensor& target,
                                   const c10::optional<at::Tensor>& row_sigma, double sigma,
                                   const at::Tensor& centers_in, bool validate) {
  check_logits(logits, "gaussian_kl (C++)");
  const int64_t rows = logits.size(0), bins = logits.size(1);
  const auto acc = acc_dtype(logits);
  const auto centers = as_acc(centers_in, acc, bins, "centers");
  auto kl = at::empty({rows}, logits.options().dtype(acc));
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bin_gaussian_kl_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const auto labels = make_labels<acc_t>(target, row_sigma, sigma, rows, bins, keep);
    const Rows<scalar_t> z(logits);
    const acc_t* c = centers.const_data_ptr<acc_t>();
    const bool centers_finite = all_finite(c, bins);
    acc_t* out = kl.data_ptr<acc_t>();
    bad = for_each_block(rows, bins, [&](int64_t, int64_t begin, int64_t end) {
      return kl_block<scalar_t, acc_t>(z, labels, c, centers_finite, bins, begin, end, out, nullptr, nullptr);
    });
  });
  if (validate && bad) raise_bad_values("gaussian_kl (C++)");
  return kl;
}

// -> grad_logits [N, K] (logits' dtype, contiguous).
at::Tensor bin_gaussian_kl_backward(const at::Tensor& grad_kl_in, const at::Tensor& logits, const at::Tensor& target,
                                    const c10::optional<at::Tensor>& row_sigma, double sigma,
                                    const at::Tensor& centers_in) {
  check_logits(logits, "gaussian_kl backward (C++)");
  const int64_t rows = logits.size(0), bins = logits.size(1);
  const auto acc = acc_dtype(logits);
  const auto centers = as_acc(centers_in, acc, bins, "centers");
  const auto grad_kl = as_acc(grad_kl_in, acc, rows, "grad");
  auto grad = at::empty({rows, bins}, logits.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "bin_gaussian_kl_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const auto labels = make_labels<acc_t>(target, row_sigma, sigma, rows, bins, keep);
    const Rows<scalar_t> z(logits);
    const acc_t* c = centers.const_data_ptr<acc_t>();
    const bool centers_finite = all_finite(c, bins);
    const acc_t* g = grad_kl.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    for_each_block(rows, bins, [&](int64_t, int64_t begin, int64_t end) {
      return kl_block<scalar_t, acc_t>(z, labels, c, centers_finite, bins, begin, end, nullptr, g, out);
    });
  });
  return grad;
}

// ---- pair_loss ----

enum class Kind { kBtMean, kBtKl, kDpl };

Kind parse_kind(const std::string& kind) {
  if (kind == "bt_mean") return Kind::kBtMean;
  if (kind == "bt_kl") return Kind::kBtKl;
  TORCH_CHECK_VALUE(kind == "dpl", ("pair_loss (C++): kind must be bt_mean, bt_kl or dpl, got " + kind).c_str());
  return Kind::kDpl;
}

// A dpl sum A below this is recomputed in log space (dpl_row_log_space): the linear-space terms it drops are
// smaller than 1e-38 / 1e-20 of it.
constexpr double kDplLinearFloor = 1e-20;

template <typename scalar_t, typename acc_t>
struct Pairs {
  Rows<scalar_t> zc, zr;
  Labels<acc_t> labels_c, labels_r;  // target nullptr: no score term
  const acc_t* c;
  bool centers_finite;
  Kind kind;
  acc_t score_weight, inverse_temperature, scale;  // scale: 1 / N, the mean's weight
  int64_t bins;
};

// Sum of the pair losses of rows [begin, end) in row order; with grad_c / grad_r, the gradient of the mean loss
// (times 1 / N) written there in acc_t.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
double pair_block(const Pairs<scalar_t, acc_t>& pairs, int64_t begin, int64_t end, acc_t* grad_c, acc_t* grad_r) {
  const int64_t bins = pairs.bins, size = bins * kLanes;
  std::vector<acc_t> buf(10 * size);
  acc_t *log_pc = buf.data(), *pc = log_pc + size, *log_pr = pc + size, *pr = log_pr + size;
  acc_t *log_qc = pr + size, *qc = log_qc + size, *log_qr = qc + size, *qr = log_qr + size;
  acc_t *gc = qr + size, *gr = gc + size;
  acc_t loss[kLanes], a[kLanes], b[kLanes], x[kLanes], slope[kLanes];
  const bool with_grad = grad_c != nullptr;
  const acc_t scale = pairs.scale;
  double sum = 0;
  for (int64_t r0 = begin; r0 < end; r0 += kLanes) {
    const int64_t n = std::min(kLanes, end - r0);
    load_tile(pairs.zc.data, pairs.zc.row_stride, pairs.zc.bin_stride, r0, n, bins, log_pc);
    load_tile(pairs.zr.data, pairs.zr.row_stride, pairs.zr.bin_stride, r0, n, bins, log_pr);
    log_softmax_tile(log_pc, pc, bins);
    log_softmax_tile(log_pr, pr, bins);
    if (pairs.kind == Kind::kDpl) {  // -log A, A = sum_i p_c,i w_i, w_i = sum_{j<i} p_r,j + p_r,i / 2
      DISTREWARD_LANES { a[l] = 0; b[l] = 0; }
      for (int64_t k = 0; k < bins; ++k) {  // gc holds w
        acc_t *pck = pc + k * kLanes, *prk = pr + k * kLanes, *wk = gc + k * kLanes;
        DISTREWARD_LANES {
          wk[l] = b[l] + acc_t(0.5) * prk[l];
          b[l] += prk[l];
          a[l] += pck[l] * wk[l];
        }
      }
      DISTREWARD_LANES loss[l] = -log_nonnegative(a[l]);
      // d(-log A)/dz_c,i = p_c,i (1 - w_i / A); rejected: p_r,j (1 - u_j / A), u_j = sum_{i>j} p_c,i + p_c,j / 2
      if (with_grad) {
        DISTREWARD_LANES { b[l] = 0; x[l] = acc_t(1) / a[l]; }
        for (int64_t k = bins - 1; k >= 0; --k) {
          acc_t *pck = pc + k * kLanes, *prk = pr + k * kLanes, *gck = gc + k * kLanes, *grk = gr + k * kLanes;
          DISTREWARD_LANES {
            grk[l] = scale * prk[l] * (1 - (b[l] + acc_t(0.5) * pck[l]) * x[l]);
            b[l] += pck[l];
            gck[l] = scale * pck[l] * (1 - gck[l] * x[l]);
          }
        }
      }
      for (int64_t l = 0; l < n; ++l) {
        if (!(a[l] >= acc_t(kDplLinearFloor))) {
          loss[l] = -dpl_row_log_space(log_pc + l, log_pr + l, bins, scale, with_grad ? gc + l : nullptr, gr + l);
        }
      }
    } else {  // softplus((E_r - E_c) / T), slope sigmoid(.) / T
      moments_tile(pc, pairs.c, bins, a, slope);
      moments_tile(pr, pairs.c, bins, b, slope);
      const acc_t inverse_temperature = pairs.inverse_temperature;
      DISTREWARD_LANES {
        x[l] = (b[l] - a[l]) * inverse_temperature;
        const acc_t e = exp_nonpositive(-std::abs(x[l]));
        loss[l] = std::max(x[l], acc_t(0)) + log1p_nonnegative(e);
        slope[l] = (x[l] >= 0 ? 1 : e) / (1 + e) * inverse_temperature * scale;
      }
      if (with_grad) {
        for (int64_t k = 0; k < bins; ++k) {
          const acc_t ck = pairs.c[k];
          acc_t *pck = pc + k * kLanes, *prk = pr + k * kLanes, *gck = gc + k * kLanes, *grk = gr + k * kLanes;
          DISTREWARD_LANES {
            gck[l] = -slope[l] * pck[l] * (ck - a[l]);
            grk[l] = slope[l] * prk[l] * (ck - b[l]);
          }
        }
      }
    }
    if (pairs.labels_c.target) {  // + w (KL_c + KL_r) / 2, gradient w / 2 (p sum(q) - q) per side
      label_tile(pairs.labels_c, r0, n, pairs.c, pairs.centers_finite, bins, log_qc, qc);
      label_tile(pairs.labels_r, r0, n, pairs.c, pairs.centers_finite, bins, log_qr, qr);
      kl_tile(log_qc, qc, log_pc, bins, a, x);
      kl_tile(log_qr, qr, log_pr, bins, b, slope);
      const acc_t half = pairs.score_weight * acc_t(0.5);
      DISTREWARD_LANES loss[l] += half * (a[l] + b[l]);
      if (with_grad) {
        const acc_t step = half * scale;
        for (int64_t k = 0; k < bins; ++k) {
          acc_t *pck = pc + k * kLanes, *prk = pr + k * kLanes, *gck = gc + k * kLanes, *grk = gr + k * kLanes;
          const acc_t *qck = qc + k * kLanes, *qrk = qr + k * kLanes;
          DISTREWARD_LANES {
            gck[l] += step * (pck[l] * x[l] - qck[l]);
            grk[l] += step * (prk[l] * slope[l] - qrk[l]);
          }
        }
      }
    }
    if (with_grad) {
      store_tile(gc, r0, n, bins, grad_c);
      store_tile(gr, r0, n, bins, grad_r);
    }
    for (int64_t l = 0; l < n; ++l) sum += loss[l];
  }
  return sum;
}

// -> (loss [] acc, grad_chosen [N, K] acc, grad_rejected [N, K] acc): the gradients of the mean loss when
// `with_grad`, else empty [0, K] tensors. Both logits share one dtype; targets / row sigmas may be absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bin_pair_loss_forward(
    const at::Tensor& logits_chosen, const at::Tensor& logits_rejected,
    const c10::optional<at::Tensor>& target_chosen, const c10::optional<at::Tensor>& target_rejected,
    const c10::optional<at::Tensor>& sigma_chosen, const c10::optional<at::Tensor>& sigma_rejected,
    double scalar_sigma_chosen, double scalar_sigma_rejected, const at::Tensor& centers_in, c10::string_view kind_name,
    double score_weight, double temperature, bool with_grad, bool validate) {
  check_logits(logits_chosen, "pair_loss (C++)");
  TORCH_CHECK_VALUE(logits_rejected.sizes() == logits_chosen.sizes() &&
                        logits_rejected.scalar_type() == logits_chosen.scalar_type() &&
                        logits_rejected.device() == logits_chosen.device(),
                    "pair_loss (C++): logits_chosen and logits_rejected must have one shape, dtype and device");
  TORCH_CHECK_VALUE(target_chosen.has_value() == target_rejected.has_value(),
                    "pair_loss (C++): give both targets or neither");
  const Kind kind = parse_kind(std::string(kind_name));
  TORCH_CHECK_VALUE(kind != Kind::kDpl || temperature == 1, "pair_loss (C++): dpl takes only temperature 1");
  const int64_t rows = logits_chosen.size(0), bins = logits_chosen.size(1);
  TORCH_CHECK_VALUE(rows > 0, "pair_loss (C++): needs at least one pair");
  const auto acc = acc_dtype(logits_chosen);
  const auto centers = as_acc(centers_in, acc, bins, "centers");
  const auto options = logits_chosen.options().dtype(acc);
  auto loss = at::empty({}, options);
  auto grad_c = at::empty({with_grad ? rows : 0, bins}, options);
  auto grad_r = at::empty({with_grad ? rows : 0, bins}, options);
  for (auto* grad : {&grad_c, &grad_r}) advise_huge_pages(grad->data_ptr(), grad->nbytes());
  std::vector<double> partial((rows + kBlockRows - 1) / kBlockRows);
  double mean_loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_chosen.scalar_type(), "bin_pair_loss", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const bool scored = kind != Kind::kBtMean && score_weight != 0 && target_chosen.has_value();
    Labels<acc_t> none;
    const acc_t* c = centers.const_data_ptr<acc_t>();
    const Pairs<scalar_t, acc_t> pairs{
        Rows<scalar_t>(logits_chosen), Rows<scalar_t>(logits_rejected),
        scored ? make_labels<acc_t>(target_chosen, sigma_chosen, scalar_sigma_chosen, rows, bins, keep) : none,
        scored ? make_labels<acc_t>(target_rejected, sigma_rejected, scalar_sigma_rejected, rows, bins, keep) : none,
        c, all_finite(c, bins), kind, static_cast<acc_t>(score_weight), static_cast<acc_t>(1 / temperature),
        acc_t(1) / static_cast<acc_t>(rows), bins};
    acc_t* gc = with_grad ? grad_c.data_ptr<acc_t>() : nullptr;
    acc_t* gr = with_grad ? grad_r.data_ptr<acc_t>() : nullptr;
    for_each_block(rows, bins, [&](int64_t block, int64_t begin, int64_t end) {
      partial[block] = pair_block<scalar_t>(pairs, begin, end, gc, gr);
      return false;
    });
    double total = 0;
    for (const double block_sum : partial) total += block_sum;  // block order: the same for any thread count
    mean_loss = total / static_cast<double>(rows);
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(mean_loss);
  });
  if (validate && !std::isfinite(mean_loss)) raise_bad_values("pair_loss (C++)");
  return {loss, grad_c, grad_r};
}

// out[i] = in[i] * scale for the two saved gradients (OpenMP-parallel for large ones).
template <typename acc_t, typename scalar_t>
void scale_pair(const acc_t* in_c, const acc_t* in_r, acc_t scale, scalar_t* out_c, scalar_t* out_r, int64_t numel) {
#pragma omp parallel for schedule(static) if (numel >= 8 * kParallelWork)
  for (int64_t i = 0; i < numel; ++i) {
    out_c[i] = static_cast<scalar_t>(in_c[i] * scale);
    out_r[i] = static_cast<scalar_t>(in_r[i] * scale);
  }
}

// (grad_chosen, grad_rejected) * grad_loss, new tensors in `dtype` (the logits'), one pass.
std::tuple<at::Tensor, at::Tensor> bin_pair_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                                                          const at::Tensor& grad_rejected, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 && grad_chosen.sizes() == grad_rejected.sizes() &&
                        grad_chosen.is_contiguous() && grad_rejected.is_contiguous() &&
                        grad_chosen.scalar_type() == grad_rejected.scalar_type(),
                    "pair_loss backward (C++): a scalar grad_loss and the forward's two saved gradients");
  const double g = grad_loss.item<double>();
  auto out_c = at::empty(grad_chosen.sizes(), grad_chosen.options().dtype(dtype));
  auto out_r = at::empty_like(out_c);
  for (auto* grad : {&out_c, &out_r}) advise_huge_pages(grad->data_ptr(), grad->nbytes());
  AT_DISPATCH_FLOATING_TYPES(grad_chosen.scalar_type(), "bin_pair_loss_backward", [&] {
    using acc_t = scalar_t;
    const acc_t *in_c = grad_chosen.const_data_ptr<acc_t>(), *in_r = grad_rejected.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bin_pair_loss_backward_out", [&] {
      scale_pair(in_c, in_r, static_cast<acc_t>(g), out_c.data_ptr<scalar_t>(), out_r.data_ptr<scalar_t>(),
                 out_c.numel());
    });
  });
  return {out_c, out_r};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distreward, m) {
  m.def("bin_moments_forward(Tensor logits, Tensor centers, bool validate) -> (Tensor, Tensor)");
  m.def("bin_moments_backward(Tensor? grad_mean, Tensor? grad_std, Tensor logits, Tensor centers) -> Tensor");
  m.def("bin_gaussian_kl_forward(Tensor logits, Tensor target, Tensor? row_sigma, float sigma, Tensor centers, "
        "bool validate) -> Tensor");
  m.def("bin_gaussian_kl_backward(Tensor grad_kl, Tensor logits, Tensor target, Tensor? row_sigma, float sigma, "
        "Tensor centers) -> Tensor");
  m.def("bin_pair_loss_forward(Tensor logits_chosen, Tensor logits_rejected, Tensor? target_chosen, "
        "Tensor? target_rejected, Tensor? sigma_chosen, Tensor? sigma_rejected, float scalar_sigma_chosen, "
        "float scalar_sigma_rejected, Tensor centers, str kind, float score_weight, float temperature, "
        "bool with_grad, bool validate) -> (Tensor, Tensor, Tensor)");
  m.def("bin_pair_loss_backward(Tensor grad_loss, Tensor grad_chosen, Tensor grad_rejected, ScalarType dtype) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(distreward, CPU, m) {
  m.impl("bin_moments_forward", &bin_moments_forward);
  m.impl("bin_moments_backward", &bin_moments_backward);
  m.impl("bin_gaussian_kl_forward", &bin_gaussian_kl_forward);
  m.impl("bin_gaussian_kl_backward", &bin_gaussian_kl_backward);
  m.impl("bin_pair_loss_forward", &bin_pair_loss_forward);
  m.impl("bin_pair_loss_backward", &bin_pair_loss_backward);
}
