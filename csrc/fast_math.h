// Branch-free math shared by the C++ kernels (logprobs.cpp, bin_ops.cpp), written so gcc vectorises the
// loops that call it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define DISTREWARD_INLINE inline __attribute__((always_inline))

namespace distreward_cpu {

// exp(x) for x <= 0 (and -inf), branch-free so loops over it vectorise: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for exp(r) (about 1 ulp), 2^n built
// in the exponent bits. Below about log(FLT_MIN) the exponent clamps to 0 and the result is exactly
// 0, as softmax of -inf must be.
DISTREWARD_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -88.f);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = std::max(static_cast<int32_t>(n) + 127, 0) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DISTREWARD_INLINE double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace distreward_cpu
