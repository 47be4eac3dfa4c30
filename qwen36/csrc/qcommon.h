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

// exp of 8 floats (AVX2/FMA): 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p a degree-6 polynomial
// (Cephes expf's coefficients); within 2 ulp of std::exp over [-87, 88]; inputs are clamped to that range
// (below it the result is ~0, above it ~1.7e38). For SiLU over thousands of channels per decode step, where
// one std::exp per element cost more than the rest of the step's DeltaNet glue.
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// silu over n floats: y / (1 + exp(-y)), 8 at a time (exp8), the tail with std::exp
static inline void silu_n(const float* y, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
    _mm256_storeu_ps(out + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  }
  for (; i < n; ++i) out[i] = silu(y[i]);
}
