// Helpers shared by qkernels.cpp (AVX2) and qkernels512.cpp (AVX-512); both are built with AVX2/FMA/F16C.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

static inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

template <typename ST> static inline float ldsc(const ST* p);
template <> inline float ldsc<float>(const float* p) { return *p; }
template <> inline float ldsc<at::Half>(const at::Half* p) {
  return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p));
}


// xs[m, g] = sum of x[m, g*gs : (g+1)*gs]: the minimum term of every group is m_g * xs[m, g]
static std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int gs) {
  const int64_t G = K / gs;
  std::vector<float> xs(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int k = 0; k < gs; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + m * K + g * gs + k));
      xs[m * G + g] = hsum256(a);
    }
  return xs;
}
