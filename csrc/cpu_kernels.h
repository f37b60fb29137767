// Shared by the C++ kernels (logprobs.cpp, bin_ops.cpp): branch-free math written so gcc vectorises the loops
// that call it, and the huge-page advice for fresh gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// log(x) for x >= 0 (0 -> -inf, +inf -> +inf, NaN or x < 0 -> NaN), branch-free so loops over it vectorise:
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial for log(m) (about 1 ulp); subnormal x
// is scaled by 2^23 first.
DISTREWARD_INLINE float log_nonnegative(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = subnormal ? x * 8388608.f : x;
  int32_t bits;
  std::memcpy(&bits, &scaled, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e -= low ? 1 : 0;
  const float f = low ? m + m - 1.f : m - 1.f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  const float exponent = static_cast<float>(e) - (subnormal ? 23.f : 0.f);
  y = y * f * z + exponent * -2.12194440e-4f - 0.5f * z;
  const float result = f + y + exponent * 0.693359375f;
  const float inf = __builtin_inff();
  return x > 0 ? (x < inf ? result : inf) : (x == 0 ? -inf : __builtin_nanf(""));
}

DISTREWARD_INLINE double log_nonnegative(double x) { return std::log(x); }

// log(1 + x) for x >= 0, to full precision for small x: log(u) corrected by (x - (u - 1)) / u, u = 1 + x.
DISTREWARD_INLINE float log1p_nonnegative(float x) {
  const float u = 1.f + x;
  return log_nonnegative(u) + (x - (u - 1.f)) / u;
}

DISTREWARD_INLINE double log1p_nonnegative(double x) { return std::log1p(x); }

// A fresh gradient is first touched by the kernel's writes; with 4 KiB pages those page faults cost more
// than the math (~0.5 s for 400 MB here). On Linux, ask for transparent huge pages (one fault per 2 MiB),
// as torch does for every allocation under THP_MEM_ALLOC_ENABLE=1. Advisory: a refusal changes nothing.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096, kHugePage = 2 << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kPage - 1);
  if (end >= begin + kHugePage) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace distreward_cpu
