// Fused rollout log-prob gather (SPEC §4): logp[b, t] = L[b, t, y] - logsumexp_v L[b, t, v].
// One pass over each row of V logits (online max + sum-exp), fp32 accumulation, OpenMP over rows.
#include <torch/extension.h>

#include <cmath>
#include <limits>

namespace {

template <typename scalar_t>
void gather_logprobs_forward_kernel(const torch::Tensor& logits, const torch::Tensor& ids,
                                    const torch::Tensor& mask, torch::Tensor& out) {
  const int64_t rows = logits.size(0) * logits.size(1);
  const int64_t vocab = logits.size(2);
  const int64_t T = logits.size(1);
  const int64_t sb = logits.stride(0), st = logits.stride(1), sv = logits.stride(2);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* live = mask.data_ptr<bool>();
  float* result = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if (!live[r]) { result[r] = 0.f; continue; }
    const scalar_t* row = data + (r / T) * sb + (r % T) * st;
    float running_max = -std::numeric_limits<float>::infinity();
    float sum_exp = 0.f;
    for (int64_t v = 0; v < vocab; ++v) {
      const float x = static_cast<float>(row[v * sv]);
      if (x > running_max) {
        sum_exp = sum_exp * std::exp(running_max - x) + 1.f;
        running_max = x;
      } else {
        sum_exp += std::exp(x - running_max);
      }
    }
    result[r] = static_cast<float>(row[id[r] * sv]) - running_max - std::log(sum_exp);
  }
}

}  // namespace

// logits [B, T, V] float32/bfloat16/float16 (any strides), ids [B, T] int64 in [0, V), mask [B, T] bool
// -> log-probs [B, T] float32 (0 where mask is false). Ids are validated by the Python caller.
torch::Tensor gather_logprobs_forward(torch::Tensor logits, torch::Tensor ids, torch::Tensor mask) {
  TORCH_CHECK(logits.dim() == 3, "logits must be [B, T, V]");
  TORCH_CHECK(ids.sizes() == logits.sizes().slice(0, 2), "ids must be [B, T]");
  TORCH_CHECK(mask.sizes() == ids.sizes() && mask.scalar_type() == torch::kBool, "mask must be bool [B, T]");
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "ids must be int64");
  ids = ids.contiguous();
  mask = mask.contiguous();
  auto out = torch::empty(ids.sizes(), logits.options().dtype(torch::kFloat));
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, logits.scalar_type(), "gather_logprobs_forward",
                                    [&] { gather_logprobs_forward_kernel<scalar_t>(logits, ids, mask, out); });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_logprobs_forward", &gather_logprobs_forward,
        "Fused log-softmax + gather over the last dim: logits [B, T, V], ids [B, T], mask [B, T] -> [B, T] fp32");
}
