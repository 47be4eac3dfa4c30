// Helpers shared by qkernels.cpp (AVX2) and qkernels512.cpp (AVX-512); both are built with AVX2/FMA/F16C.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>
#include <cmath>

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

// R rows of x times one weight row w (fp32, K long): each output the same operation sequence whatever R
// (f32_linear in qkernels.cpp; the fused MoE step in qkernels512.cpp computes the router with it too)
template <int R>
static inline void f32_dot_rows(const float* const* xs, const float* w, int64_t K, float* const* outs) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r] + k), w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r] + k + 8), w1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float lane[8];
    _mm256_store_ps(lane, _mm256_add_ps(a0[r], a1[r]));
    float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (int64_t j = k; j < K; ++j) sum += xs[r][j] * w[j];
    *outs[r] = sum;
  }
}

static inline float silu(float y) { return y / (1.f + std::exp(-y)); }
