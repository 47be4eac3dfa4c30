// Weight-only int4 / int8 matmul kernels for x86 CPUs (AVX2 + FMA + F16C), used by qwen36/kernels.py.
// Decode on CPU is memory-bound: these read each quantized weight once and never materialise it in fp32.
//
// int4 layout (qwen36/quant.py): W [N, K] in groups of gs (a multiple of 32) along K.
//   wq uint8 [N, K/2]: in every 32-element block b of a row, byte 16*b + j holds element 32b + j in its
//   low nibble and element 32b + 16 + j in its high nibble; codes 0..15.
//   sc, mn fp32 [N, K/gs]:  w = sc * code + mn.
// int8 layout: wq int8 [N, K], sc fp32 [N]:  w = sc * q.
// Activations x are fp32 [M, K], contiguous; outputs fp32 [M, N]. Threads: torch's intra-op pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>

#include "qcommon.h"

static const int64_t g_pf = 4096;  // software prefetch distance (bytes)
// MT activation rows x 32 weights (w[0..3]: 8 each) into ACC accumulators per row (ACC chains hide the
// FMA latency; fewer when MT rows already give enough independent chains).
template <int MT> constexpr int acc_chains() { return (MT <= 2) ? 4 : (MT == 4 ? 2 : 1); }

template <int MT, int ACC>
static inline void fma32(__m256 (&acc)[MT][ACC], const __m256 (&w)[4], const float* x, int64_t ldx) {
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < 4; ++i)
      acc[m][i % ACC] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + m * ldx + 8 * i), acc[m][i % ACC]);
}

template <int MT, int ACC>
static inline float acc_sum(__m256 (&acc)[MT][ACC], int m) {
  __m256 t = acc[m][0];
  for (int a = 1; a < ACC; ++a) t = _mm256_add_ps(t, acc[m][a]);
  return hsum256(t);
}

// ------------------------------------------------------------------------------------
// int4 weights, fp32 activations.  One output row n, MT activation rows.
//   acc[m] += sum_k (s_g * q_k) * x[m,k]     (vector, FMA)
//   zacc[m] += m_g * xsum[m,g]               (scalar)
// ------------------------------------------------------------------------------------
template <int MT, typename ST>
static inline void q4f_row(const float* x, int64_t ldx, const float* xsum, int64_t G,
                           const uint8_t* wrow, const ST* srow, const ST* mrow, int64_t K,
                           int gs, float* out, int64_t ldo) {
  constexpr int ACC = acc_chains<MT>();
  __m256 acc[MT][ACC];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < ACC; ++a) acc[m][a] = _mm256_setzero_ps();
  float zacc[MT];
  for (int m = 0; m < MT; ++m) zacc[m] = 0.f;
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const int sub = gs / 32;
  for (int64_t g = 0; g < G; ++g) {
    const float s = ldsc<ST>(srow + g);
    const float mn = mrow ? ldsc<ST>(mrow + g) : -8.f * s;
    for (int m = 0; m < MT; ++m) zacc[m] += mn * xsum[m * G + g];
    const __m256 sv = _mm256_set1_ps(s);
    for (int b = 0; b < sub; ++b) {
      const int64_t k0 = g * gs + b * 32;
      const uint8_t* p = wrow + k0 / 2;
      __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
      __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
      const __m256 w[4] = {
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), sv),   // k0+0..7
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), sv),   // k0+8..15
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), sv),     // k0+16..23
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), sv)};    // k0+24..31
      fma32<MT, ACC>(acc, w, x + k0, ldx);
    }
  }
  for (int m = 0; m < MT; ++m) out[m * ldo] = acc_sum<MT, ACC>(acc, m) + zacc[m];
}

// Specialised M=1 version: integer-exact group dot then one scale FMA per group
// (saves the 4 multiplies per 32 weights).
template <typename ST>
static inline float q4f_row_m1(const float* x, const float* xsum, int64_t G, const uint8_t* wrow,
                               const ST* srow, const ST* mrow, int gs) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  float z = 0.f;
  const int sub = gs / 32;
  const int64_t pf = g_pf;
  for (int64_t g = 0; g < G; ++g) {
    if (pf && ((g * gs / 2) & 63) == 0) _mm_prefetch((const char*)(wrow + g * gs / 2 + pf), _MM_HINT_T0);
    const float s = ldsc<ST>(srow + g);
    const float mn = mrow ? ldsc<ST>(mrow + g) : -8.f * s;
    z += mn * xsum[g];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int b = 0; b < sub; ++b) {
      const int64_t k0 = g * gs + b * 32;
      const uint8_t* p = wrow + k0 / 2;
      const float* xp = x + k0;
      __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
      __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), _mm256_loadu_ps(xp + 0), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), _mm256_loadu_ps(xp + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), _mm256_loadu_ps(xp + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), _mm256_loadu_ps(xp + 24), a3);
    }
    const __m256 sv = _mm256_set1_ps(s);
    tot0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), sv, tot0);
    tot1 = _mm256_fmadd_ps(_mm256_add_ps(a2, a3), sv, tot1);
  }
  return hsum256(_mm256_add_ps(tot0, tot1)) + z;
}

template <typename ST>
static void q4f_rows(const float* x, int64_t M, int64_t K, const float* xsum, const uint8_t* wq,
                     const ST* sc, const ST* mn, int gs, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = wq + n * (K / 2);
    const ST* srow = sc + n * G;
    const ST* mrow = mn ? mn + n * G : nullptr;
    int64_t m = 0;
    if (M == 1) {
      y[n] = q4f_row_m1<ST>(x, xsum, G, wrow, srow, mrow, gs);
      continue;
    }
    for (; m + 8 <= M; m += 8)
      q4f_row<8, ST>(x + m * K, K, xsum + m * G, G, wrow, srow, mrow, K, gs, y + m * ldy + n, ldy);
    for (; m + 4 <= M; m += 4)
      q4f_row<4, ST>(x + m * K, K, xsum + m * G, G, wrow, srow, mrow, K, gs, y + m * ldy + n, ldy);
    for (; m + 2 <= M; m += 2)
      q4f_row<2, ST>(x + m * K, K, xsum + m * G, G, wrow, srow, mrow, K, gs, y + m * ldy + n, ldy);
    for (; m < M; ++m)
      q4f_row<1, ST>(x + m * K, K, xsum + m * G, G, wrow, srow, mrow, K, gs, y + m * ldy + n, ldy);
  }
}


static void check_q4(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sc,
                     const c10::optional<torch::Tensor>& mn, int64_t gs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous fp32 [M,K]");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.is_contiguous(), "wq must be contiguous uint8");
  TORCH_CHECK(gs % 32 == 0 && x.size(1) % gs == 0, "gs must be a multiple of 32 dividing K");
  TORCH_CHECK(sc.is_contiguous() && (sc.dtype() == torch::kFloat32 || sc.dtype() == torch::kFloat16), "scales fp32/fp16 contiguous");
  if (mn) TORCH_CHECK(mn->dtype() == sc.dtype() && mn->is_contiguous(), "mins must match scales");
}

// y[M,N] = x[M,K] @ dequant(wq)^T
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc,
                        c10::optional<torch::Tensor> mn, int64_t gs) {
  check_q4(x, wq, sc, mn, gs);
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(wq.size(-1) == K / 2 && sc.size(-1) == K / gs, "shape mismatch");
  auto y = torch::empty({M, N}, x.options());
  auto xs = group_sums(x.data_ptr<float>(), M, K, gs);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(1, K / 64));
  if (sc.dtype() == torch::kFloat32) {
    const float* s = sc.data_ptr<float>();
    const float* m = mn ? mn->data_ptr<float>() : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      q4f_rows<float>(xp, M, K, xs.data(), wp, s, m, (int)gs, yp, N, b, e);
    });
  } else {
    const at::Half* s = sc.data_ptr<at::Half>();
    const at::Half* m = mn ? mn->data_ptr<at::Half>() : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      q4f_rows<at::Half>(xp, M, K, xs.data(), wp, s, m, (int)gs, yp, N, b, e);
    });
  }
  return y;
}

// Grouped (MoE) version: weights for all experts stacked: wq [E, N, K/2], sc/mn [E, N, K/gs].
// ids int64 [T]; x [T, K] (one row per selected expert) or [1, K] (broadcast). Returns [T, N].
// One parallel region over all T*N rows (no Python loop).
torch::Tensor q4_moe_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc,
                            c10::optional<torch::Tensor> mn, int64_t gs, torch::Tensor ids) {
  check_q4(x, wq, sc, mn, gs);
  TORCH_CHECK(wq.dim() == 3 && ids.dtype() == torch::kInt64, "wq [E,N,K/2], ids int64");
  const int64_t T = ids.numel(), K = x.size(1), N = wq.size(1), G = K / gs;
  const bool bcast = x.size(0) == 1;
  TORCH_CHECK(bcast || x.size(0) == T, "x must be [1,K] or [T,K]");
  auto y = torch::empty({T, N}, x.options());
  auto xs = group_sums(x.data_ptr<float>(), x.size(0), K, gs);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(sc.dtype() == torch::kFloat32, "moe: fp32 scales only in this prototype");
  const float* s = sc.data_ptr<float>();
  const float* m = mn ? mn->data_ptr<float>() : nullptr;
  at::parallel_for(0, T * N, 64, [&](int64_t b, int64_t e) {
    while (b < e) {
      const int64_t t = b / N, n0 = b % N, n1 = std::min<int64_t>(N, n0 + (e - b));
      const int64_t ex = id[t];
      const float* xr = xp + (bcast ? 0 : t * K);
      const float* xsr = xs.data() + (bcast ? 0 : t * G);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t r = ex * N + n;
        yp[t * N + n] = q4f_row_m1<float>(xr, xsr, G, wp + r * (K / 2), s + r * G,
                                          m ? m + r * G : nullptr, (int)gs);
      }
      b += n1 - n0;
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------
// int8 weights (per output channel scale), fp32 activations.
// ------------------------------------------------------------------------------------
template <int MT>
static inline void q8w_row(const float* x, int64_t K, const int8_t* wrow, float s, float* out,
                           int64_t ldo) {
  constexpr int ACC = acc_chains<MT>();
  __m256 acc[MT][ACC];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < ACC; ++a) acc[m][a] = _mm256_setzero_ps();
  const int64_t pf = g_pf;
  for (int64_t k = 0; k < K; k += 32) {
    if (pf && (k & 63) == 0) _mm_prefetch((const char*)(wrow + k + pf), _MM_HINT_T0);
    __m256 w[4];
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wrow + k + 8 * i))));
    fma32<MT, ACC>(acc, w, x + k, K);
  }
  for (int m = 0; m < MT; ++m) out[m * ldo] = acc_sum<MT, ACC>(acc, m) * s;
}

torch::Tensor q8w_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x fp32 contiguous");
  TORCH_CHECK(wq.dtype() == torch::kInt8 && wq.is_contiguous() && sc.dtype() == torch::kFloat32, "int8 w, fp32 scales");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(K % 32 == 0, "K % 32");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int8_t* wr = wp + n * K;
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) q8w_row<8>(xp + m * K, K, wr, s[n], yp + m * N + n, N);
      for (; m + 4 <= M; m += 4) q8w_row<4>(xp + m * K, K, wr, s[n], yp + m * N + n, N);
      for (; m < M; ++m) q8w_row<1>(xp + m * K, K, wr, s[n], yp + m * N + n, N);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------
// Dequantise q4 -> fp32 or bf16 [N, K] (for prefill: dequant once, then MKL/oneDNN GEMM).
// ------------------------------------------------------------------------------------
torch::Tensor q4_dequant(torch::Tensor wq, torch::Tensor sc, c10::optional<torch::Tensor> mn,
                         int64_t gs, bool bf16, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(sc.dtype() == torch::kFloat32, "fp32 scales");
  const int64_t N = wq.size(0), K = wq.size(1) * 2, G = K / gs;
  // pass a persistent `out` buffer to avoid a fresh mmap + page faults per call for large weights
  auto out = out_opt ? *out_opt : torch::empty({N, K}, wq.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && out.scalar_type() == (bf16 ? torch::kBFloat16 : torch::kFloat32), "bad out");
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  const float* m = mn ? mn->data_ptr<float>() : nullptr;
  void* op = out.data_ptr();
  const __m256i mask = _mm256_set1_epi32(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float sf = s[n * G + g];
        const __m256 sv = _mm256_set1_ps(sf);
        const __m256 mv = _mm256_set1_ps(m ? m[n * G + g] : -8.f * sf);
        for (int bb = 0; bb < gs / 32; ++bb) {
          const int64_t k0 = g * gs + bb * 32;
          const uint8_t* p = wp + n * (K / 2) + k0 / 2;
          __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
          __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
          __m256 f[4] = {
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), sv, mv),
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), sv, mv),
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), sv, mv),
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), sv, mv)};
          if (!bf16) {
            float* o = (float*)op + n * K + k0;
            for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, f[i]);
          } else {
            uint16_t* o = (uint16_t*)op + n * K + k0;
            for (int i = 0; i < 4; ++i) {
              // round-to-nearest-even fp32 -> bf16
              __m256i u = _mm256_castps_si256(f[i]);
              __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                       _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
              r = _mm256_srli_epi32(r, 16);
              __m128i pk = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
              _mm_storeu_si128((__m128i*)(o + 8 * i), pk);
            }
          }
        }
      }
  });
  return out;
}

// ------------------------------------------------------------------------------------
// fp32 x [M, K] @ w [N, K]^T for the small steps of decoding (M <= 64): every output is the same fixed
// sequence of operations whatever M is, so a row's result never depends on the rows beside it (MKL's gemv
// for M = 1 and its gemm for M > 1 sum in different orders). Speculative verification runs 1 + k rows where
// decoding runs 1; with this the two agree bit for bit.
// ------------------------------------------------------------------------------------
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && x.dim() == 2 && w.dim() == 2 &&
              x.size(1) == w.size(1), "x [M,K], w [N,K] fp32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const float* wn = wp + n * K;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        const float* xs[4] = {xp + m * K, xp + (m + 1) * K, xp + (m + 2) * K, xp + (m + 3) * K};
        float* os[4] = {yp + m * N + n, yp + (m + 1) * N + n, yp + (m + 2) * N + n, yp + (m + 3) * N + n};
        f32_dot_rows<4>(xs, wn, K, os);
      }
      for (; m < M; ++m) {
        const float* xs[1] = {xp + m * K};
        float* os[1] = {yp + m * N + n};
        f32_dot_rows<1>(xs, wn, K, os);
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------
// Decode glue: the small per-token operations of a layer in one call each, instead of tens of tensor ops
// (each a few microseconds of dispatch on a step that moves little data). Every row is computed alike
// whatever the row count, as in f32_linear. References: layers/norm.py, layers/deltanet.py.
// ------------------------------------------------------------------------------------
static inline float sum_squares(const float* x, int64_t n) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) { const __m256 v = _mm256_loadu_ps(x + i); a = _mm256_fmadd_ps(v, v, a); }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, a);
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = x / rms(x) * (1 + w) per row (zero-centred RMSNorm). x [M, H] fp32, w [H] fp32.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && x.dim() == 2 && w.numel() == x.size(1),
              "x [M,H], w [H] fp32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * H;
    const float inv = 1.f / std::sqrt(sum_squares(r, H) / H + (float)eps);
    float* o = yp + m * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) o[i] = r[i] * inv * (1.f + wp[i]);
  }
  return y;
}

// DeltaNet's output norm per (row, value head): w * o / rms(o) * silu(z). o [M, Hv, Dv], z [M, Hv * Dv], w [Dv].
torch::Tensor gated_rms_norm(torch::Tensor o, torch::Tensor z, torch::Tensor w, double eps) {
  TORCH_CHECK(o.dtype() == torch::kFloat32 && z.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 &&
              o.dim() == 3 && z.numel() == o.numel() && w.numel() == o.size(2), "o [M,Hv,Dv], z, w [Dv] fp32");
  o = o.contiguous();
  z = z.contiguous();
  w = w.contiguous();
  const int64_t M = o.size(0), Hv = o.size(1), D = o.size(2);
  auto y = torch::empty({M, Hv * D}, o.options());
  const float *op = o.data_ptr<float>(), *zp = z.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M * Hv, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* x = op + r * D;
      const float inv = 1.f / std::sqrt(sum_squares(x, D) / D + (float)eps);
      for (int64_t i = 0; i < D; ++i) yp[r * D + i] = wp[i] * (x[i] * inv) * silu(zp[r * D + i]);
    }
  });
  return y;
}

// DeltaNet, what comes between the input projections and the recurrence, for T tokens of B sequences:
// causal conv (state [S, W-1, C] in place, taps summed first to last), SiLU, split into q | k | v,
// q and k L2-normalised per key head (q also scaled by Dk^-0.5), beta = sigmoid(b),
// g = -exp(A_log) * softplus(a + dt_bias). m [B, T, C]; a, b [B, T, Hv]; conv_w [C, W].
// keep_conv [S, Tk, W-1, C] / nkeep [B]: the conv state after token t < nkeep[b] also goes to
// keep_conv[slots[b], t]. Returns q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g, beta [B, T, Hv].
std::vector<torch::Tensor> delta_prep(torch::Tensor m, torch::Tensor a, torch::Tensor b, torch::Tensor conv,
                                      torch::Tensor conv_w, torch::Tensor slots, torch::Tensor A_log,
                                      torch::Tensor dt_bias, torch::Tensor keep_conv, torch::Tensor nkeep,
                                      int64_t Hk, int64_t Dk, int64_t Dv) {
  for (auto* t : {&m, &a, &b, &conv, &conv_w, &A_log, &dt_bias})
    TORCH_CHECK(t->dtype() == torch::kFloat32, "delta_prep: fp32 tensors");
  TORCH_CHECK(conv.is_contiguous() && conv.dim() == 3, "conv state [S, W-1, C] contiguous");
  m = m.contiguous(); a = a.contiguous(); b = b.contiguous(); conv_w = conv_w.contiguous();
  A_log = A_log.contiguous(); dt_bias = dt_bias.contiguous();
  const int64_t B = m.size(0), T = m.size(1), C = m.size(2), W = conv_w.size(1), Hv = a.size(2);
  const int64_t KD = Hk * Dk;
  TORCH_CHECK(conv.size(1) == W - 1 && conv.size(2) == C && conv_w.size(0) == C && C == 2 * KD + Hv * Dv,
              "delta_prep: shapes");
  TORCH_CHECK(slots.numel() == B && nkeep.numel() == B, "slots, nkeep [B]");
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* nk = nkeep.data_ptr<int64_t>();
  int64_t Tk = 0;
  float* kc = nullptr;
  if (keep_conv.numel() > 0) {
    TORCH_CHECK(keep_conv.dtype() == torch::kFloat32 && keep_conv.is_contiguous() && keep_conv.dim() == 4 &&
                keep_conv.size(2) == W - 1 && keep_conv.size(3) == C, "keep_conv [S, Tk, W-1, C]");
    Tk = keep_conv.size(1);
    kc = keep_conv.data_ptr<float>();
  }
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(sl[i] >= 0 && sl[i] < conv.size(0), "slot out of range");
    TORCH_CHECK(nk[i] >= 0 && nk[i] <= std::min(Tk, T), "nkeep out of range");
  }
  auto opts = m.options();
  auto q = torch::empty({B, T, Hk, Dk}, opts), k = torch::empty({B, T, Hk, Dk}, opts);
  auto v = torch::empty({B, T, Hv, Dv}, opts), g = torch::empty({B, T, Hv}, opts), beta = torch::empty({B, T, Hv}, opts);
  const float *mp = m.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *cw = conv_w.data_ptr<float>(), *al = A_log.data_ptr<float>(), *db = dt_bias.data_ptr<float>();
  float *cs = conv.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *gp = g.data_ptr<float>(), *btp = beta.data_ptr<float>();
  const float qscale = 1.f / std::sqrt((float)Dk);
  // every sequence's conv window (its state, then its T inputs), then conv + SiLU of every (token, channel)
  // in parallel (each output is the same sequence of operations as one at a time), then the per-head parts
  const int64_t X = (W - 1 + T) * C;
  std::vector<float> xs(B * X), y(B * T * C);
  for (int64_t i = 0; i < B; ++i) {
    const float* state = cs + sl[i] * (W - 1) * C;
    std::copy(state, state + (W - 1) * C, xs.begin() + i * X);
    std::copy(mp + i * T * C, mp + (i + 1) * T * C, xs.begin() + i * X + (W - 1) * C);
  }
  const int64_t CB = 512, nCB = (C + CB - 1) / CB;
  at::parallel_for(0, B * T * nCB, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t bt = it / nCB, i = bt / T, t = bt % T, c0 = (it % nCB) * CB, c1 = std::min(C, c0 + CB);
      const float* xw = xs.data() + i * X + t * C;
      for (int64_t c = c0; c < c1; ++c) {
        float acc = xw[c] * cw[c * W];
        for (int64_t j = 1; j < W; ++j) acc += xw[j * C + c] * cw[c * W + j];
        y[bt * C + c] = silu(acc);
      }
    }
  });
  at::parallel_for(0, B * T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bt = lo; bt < hi; ++bt) {
      const float* yr = y.data() + bt * C;
      for (int64_t h = 0; h < Hk; ++h) {
        const float* yq = yr + h * Dk;
        const float* yk = yr + KD + h * Dk;
        const float iq = 1.f / std::sqrt(sum_squares(yq, Dk) + 1e-6f) * qscale;
        const float ik = 1.f / std::sqrt(sum_squares(yk, Dk) + 1e-6f);
        float* oq = qp + (bt * Hk + h) * Dk;
        float* ok = kp + (bt * Hk + h) * Dk;
        for (int64_t d = 0; d < Dk; ++d) { oq[d] = yq[d] * iq; ok[d] = yk[d] * ik; }
      }
      std::copy(yr + 2 * KD, yr + C, vp + bt * Hv * Dv);
      for (int64_t h = 0; h < Hv; ++h) {
        const float x = ap[bt * Hv + h] + db[h];
        const float sp = x > 20.f ? x : std::log1p(std::exp(x));
        gp[bt * Hv + h] = -std::exp(al[h]) * sp;
        btp[bt * Hv + h] = 1.f / (1.f + std::exp(-bp[bt * Hv + h]));
      }
    }
  });
  for (int64_t i = 0; i < B; ++i) {                // conv states: after each kept token, and after the last
    const float* xw = xs.data() + i * X;
    for (int64_t t = 0; t < nk[i]; ++t)
      std::copy(xw + (t + 1) * C, xw + (t + W) * C, kc + (sl[i] * Tk + t) * (W - 1) * C);
    std::copy(xw + T * C, xw + (T + W - 1) * C, cs + sl[i] * (W - 1) * C);
  }
  return {q, k, v, g, beta};
}

// ------------------------------------------------------------------------------------
// Denormal floats (|x| < 1.2e-38) cost ~100x per operation on x86. DeltaNet's decays underflow into them
// (exp of cumulated log-decays down to -3600 in a 64-token chunk; states decaying towards zero), which made
// a 512-token chunk of the delta rule ~4x slower. Flush-to-zero and denormals-are-zero are per-thread
// settings: set them on every thread of ATen's pool (and the caller's).
// ------------------------------------------------------------------------------------
int64_t flush_denormals(bool on) {
  const int n = at::get_num_threads();
  std::atomic<int64_t> done{0};
  auto set = [on]() {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | 0x8040u) : (csr & ~0x8040u));    // FTZ (bit 15) | DAZ (bit 6)
  };
  set();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    set();
    done += hi - lo;
  });
  return done.load();
}

// One token of the gated delta rule for one (sequence, value head): S [K, V] updated in place.
// One pass reads S for S^T k and S^T q; a second pass, while S (64 KB) is still in cache, writes
// S = a S + k d^T with a = exp(g), d = (v - a S^T k) beta; o = a S^T q + (k.q) d = S'^T q.
static inline void delta_token(float* S, const float* kk, const float* qq, const float* vv, float g, float bt,
                               float* oo, float* pk, float* pq, float* d, int64_t K, int64_t V) {
  std::fill(pk, pk + V, 0.f);
  std::fill(pq, pq + V, 0.f);
  float kq = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    const float ki = kk[i], qi = qq[i];
    const float* row = S + i * V;
    kq += ki * qi;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) { pk[j] += ki * row[j]; pq[j] += qi * row[j]; }
  }
  const float a = std::exp(g);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    d[j] = (vv[j] - a * pk[j]) * bt;
    oo[j] = a * pq[j] + kq * d[j];
  }
  for (int64_t i = 0; i < K; ++i) {
    const float ki = kk[i];
    float* row = S + i * V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] = a * row[j] + ki * d[j];
  }
}

// delta_token for V = 128 on AVX-512 CPUs: the two read vectors (S^T k, S^T q) stay in 16 registers for the
// whole pass over S instead of going through memory for each of its K rows. The same operations per element
// in the same order as delta_token (products summed over the rows first to last).
#define D512 __attribute__((target("avx512f")))
D512 static inline void delta_token128(float* S, const float* kk, const float* qq, const float* vv, float g,
                                       float bt, float* oo, int64_t K) {
  __m512 pk[8], pq[8];
  for (int j = 0; j < 8; ++j) { pk[j] = _mm512_setzero_ps(); pq[j] = _mm512_setzero_ps(); }
  float kq = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    const __m512 ki = _mm512_set1_ps(kk[i]), qi = _mm512_set1_ps(qq[i]);
    kq += kk[i] * qq[i];
    const float* row = S + i * 128;
    for (int j = 0; j < 8; ++j) {
      const __m512 r = _mm512_loadu_ps(row + 16 * j);
      pk[j] = _mm512_fmadd_ps(ki, r, pk[j]);
      pq[j] = _mm512_fmadd_ps(qi, r, pq[j]);
    }
  }
  const float a = std::exp(g);
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(bt), vkq = _mm512_set1_ps(kq);
  __m512 d[8];
  for (int j = 0; j < 8; ++j) {
    d[j] = _mm512_mul_ps(_mm512_fnmadd_ps(va, pk[j], _mm512_loadu_ps(vv + 16 * j)), vb);
    _mm512_storeu_ps(oo + 16 * j, _mm512_fmadd_ps(vkq, d[j], _mm512_mul_ps(va, pq[j])));
  }
  for (int64_t i = 0; i < K; ++i) {
    const __m512 ki = _mm512_set1_ps(kk[i]);
    float* row = S + i * 128;
    for (int j = 0; j < 8; ++j)
      _mm512_storeu_ps(row + 16 * j, _mm512_fmadd_ps(ki, d[j], _mm512_mul_ps(va, _mm512_loadu_ps(row + 16 * j))));
  }
}

static const bool kHasAvx512 = __builtin_cpu_supports("avx512f");

// T tokens of the gated delta rule for each of B sequences, their states updated in place.
// state [S, H, K, V] fp32 (every slot); slots int64 [B]; q, k [B, T, Hk, K] fp32 (L2-normalised, q scaled);
// v [B, T, H, V]; g (log decay), beta [B, T, H]. Value head h reads key head h / (H / Hk). Returns o [B, T, H, V].
// keep [S, Tk, H, K, V] (or empty) and nkeep int64 [B]: the state after token t < nkeep[b] is also written to
// keep[slots[b], t] (speculative decoding resumes from the last accepted token). Each head's state stays in
// cache across the T tokens: DRAM sees one read and one write of it, plus the kept copies.
torch::Tensor delta_steps(torch::Tensor state, torch::Tensor slots, torch::Tensor q, torch::Tensor k,
                          torch::Tensor v, torch::Tensor g, torch::Tensor beta, torch::Tensor keep,
                          torch::Tensor nkeep) {
  TORCH_CHECK(state.dtype() == torch::kFloat32 && state.is_contiguous() && state.dim() == 4, "state [S,H,K,V] fp32");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && nkeep.dtype() == torch::kInt64, "slots, nkeep int64");
  for (auto* t : {&q, &k, &v, &g, &beta})
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous(), "q, k, v, g, beta: contiguous fp32");
  const int64_t B = slots.numel(), H = state.size(1), K = state.size(2), V = state.size(3);
  TORCH_CHECK(q.dim() == 4 && q.size(0) == B && k.sizes() == q.sizes() && q.size(3) == K, "q, k [B,T,Hk,K]");
  const int64_t T = q.size(1), Hk = q.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "value heads a multiple of key heads");
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == T && v.size(2) == H && v.size(3) == V &&
              g.numel() == B * T * H && beta.numel() == B * T * H, "v [B,T,H,V], g and beta [B,T,H]");
  TORCH_CHECK(nkeep.numel() == B, "nkeep [B]");
  const int64_t nslots = state.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* nk = nkeep.data_ptr<int64_t>();
  int64_t Tk = 0;
  float* kp_ = nullptr;
  if (keep.numel() > 0) {
    TORCH_CHECK(keep.dtype() == torch::kFloat32 && keep.is_contiguous() && keep.dim() == 5 && keep.size(0) == nslots &&
                keep.size(2) == H && keep.size(3) == K && keep.size(4) == V, "keep [S,Tk,H,K,V] fp32");
    Tk = keep.size(1);
    kp_ = keep.data_ptr<float>();
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] >= 0 && sl[b] < nslots, "slot out of range");
    TORCH_CHECK(nk[b] >= 0 && nk[b] <= std::min(Tk, T), "nkeep out of range");
  }
  auto o = torch::empty({B, T, H, V}, v.options());
  const int64_t rep = H / Hk;
  float* sp = state.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float* op = o.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> pk(V), pq(V), d(V);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = sp + (sl[b] * H + h) * K * V;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t bt = b * T + t;
        if (V == 128 && kHasAvx512)
          delta_token128(S, kp + (bt * Hk + h / rep) * K, qp + (bt * Hk + h / rep) * K, vp + (bt * H + h) * V,
                         gp[bt * H + h], bp[bt * H + h], op + (bt * H + h) * V, K);
        else
          delta_token(S, kp + (bt * Hk + h / rep) * K, qp + (bt * Hk + h / rep) * K, vp + (bt * H + h) * V,
                      gp[bt * H + h], bp[bt * H + h], op + (bt * H + h) * V, pk.data(), pq.data(), d.data(), K, V);
        if (t < nk[b]) std::copy(S, S + K * V, kp_ + ((sl[b] * Tk + t) * H + h) * K * V);
      }
    }
  });
  return o;
}


// A DeltaNet decode step from the input projections to the output norm, in one call: delta_prep, delta_steps
// and gated_rms_norm one after the other (the same values; one call instead of three and the tensor ops
// between them). B sequences of one token: m [B, 1, C], a, b [B, 1, Hv], z [B, Hv * Dv]. Returns [B, Hv * Dv].
torch::Tensor delta_decode(torch::Tensor m, torch::Tensor a, torch::Tensor b, torch::Tensor conv,
                           torch::Tensor conv_w, torch::Tensor slots, torch::Tensor A_log, torch::Tensor dt_bias,
                           torch::Tensor keep_conv, torch::Tensor nkeep, torch::Tensor state, torch::Tensor keep,
                           torch::Tensor z, torch::Tensor norm_w, double eps, int64_t Hk, int64_t Dk, int64_t Dv) {
  auto p = delta_prep(m, a, b, conv, conv_w, slots, A_log, dt_bias, keep_conv, nkeep, Hk, Dk, Dv);
  auto o = delta_steps(state, slots, p[0], p[1], p[2], p[3], p[4], keep, nkeep);
  return gated_rms_norm(o.view({-1, o.size(2), o.size(3)}), z, norm_w, eps);
}


// ------------------------------------------------------------------------------------
// Gated attention for short chunks (decode: one token per sequence; speculative verification: 1 + k), every
// query alone against its cached prefix, so a query's result never depends on how many came with it:
//   per token: q and k heads RMS-normed ((1 + w), as rms_norm), the first rd dims rotated (NeoX halves,
//   rot * cos + rotate_half(rot) * sin, each product rounded as the tensor ops do), k and v written to their
//   cache rows; per query head: softmax(scale * q.K) over the sequence's rows up to its own, times V, times
//   sigmoid(gate). qg [n, Hq, 2D] (per head: query D | gate D), k, v [n, Hkv, D], cos, sin [n, rd];
//   kc, vc [R, Hkv, D] in fp32, bf16 or int8; ks, vs [R, Hkv] fp32: the int8 rows' scales (row = scale * code;
//   written here as absmax / 127, round to nearest even, as ops/attention.py quantize_kv), empty otherwise;
//   rows: every sequence's cache rows (rcu [B+1] offsets), tcu [B+1]: its tokens in n.
//   Returns [n, Hq * D]. References: layers/attention.py (tensor ops), ops/attention.py.
// Memory traffic: per (token, KV head) the rep = Hq / Hkv query heads that share the KV head score one pass
// over its K rows and accumulate each V row once (K and V dequantized in registers). A query's keys are
// split into blocks of kKeyBlock rows counted from the sequence's first row (fixed: independent of threads
// and of the other tokens of the call); the (token, KV head, block) tasks run in parallel, each leaving its
// max, sum and unnormalised accumulator, merged per query head in block order. One block: the plain softmax.
// ------------------------------------------------------------------------------------
static const int64_t kKeyBlock = 512;

__attribute__((optimize("-ffp-contract=off")))
static void norm_rope(const float* x, const float* w, float eps, const float* cs, const float* sn, int64_t D,
                      int64_t rd, float* n, float* out) {
  const float inv = 1.f / std::sqrt(sum_squares(x, D) / D + eps);
  for (int64_t i = 0; i < D; ++i) n[i] = x[i] * inv * (1.f + w[i]);
  const int64_t h = rd / 2;
  for (int64_t d = 0; d < h; ++d) { const float a = n[d] * cs[d], b = -n[d + h] * sn[d]; out[d] = a + b; }
  for (int64_t d = h; d < rd; ++d) { const float a = n[d] * cs[d], b = n[d - h] * sn[d]; out[d] = a + b; }
  for (int64_t d = rd; d < D; ++d) out[d] = n[d];
}

// 8 KV elements as fp32 lanes
static inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 kv_load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline __m256 kv_load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline float kv_float(float x) { return x; }
static inline float kv_float(c10::BFloat16 x) { return (float)x; }
static inline float kv_float(int8_t x) { return (float)x; }

static inline float hsum8(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// R query rows against one key row w: one FMA chain per row (two below 4 rows, to hide the FMA latency),
// the key's 8 lanes loaded (and dequantized) once for all R
template <int R, typename T>
static inline void kv_dot_rows(const float* const* xs, const T* w, int64_t K, float* outs) {
  constexpr int C = R < 4 ? 2 : 1;
  __m256 a[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) a[c][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * C <= K; k += 8 * C)
    for (int c = 0; c < C; ++c) {
      const __m256 wv = kv_load8(w + k + 8 * c);
      for (int r = 0; r < R; ++r) a[c][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r] + k + 8 * c), wv, a[c][r]);
    }
  for (int r = 0; r < R; ++r) {
    float sum = hsum8(C == 2 ? _mm256_add_ps(a[0][r], a[C - 1][r]) : a[0][r]);
    for (int64_t j = k; j < K; ++j) sum += xs[r][j] * kv_float(w[j]);
    outs[r] = sum;
  }
}

// e^x for x <= 0 (softmax weights), 8 lanes: x = n ln2 + r, Cephes' degree-5 polynomial for e^r (~1 ulp)
static inline __m256 exp256_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T0);
}

struct KvView {                 // one KV head's rows of a cache: row i of head g at base + (i * Hkv + g) * D
  const void* k; const void* v; const float* ks; const float* vs; int64_t Hkv, D;
};

// One (token, KV head, key block) task for R query heads: scores of keys rp[0..nb) for each head, their max
// mx[h] and exp-sum sum[h], and acc[h][D] = sum_i exp(s_hi - mx_h) * V_i (unnormalised).
template <int R, typename T>
static void attend_block(const float* const* qs, const KvView& kv, int64_t g, const int64_t* rp, int64_t nb,
                         float scale, float* sc, float* mx, float* sum, float* const* acc) {
  const int64_t D = kv.D, Hkv = kv.Hkv;
  const T *kb = (const T*)kv.k, *vb = (const T*)kv.v;
  const bool q8 = kv.ks != nullptr;
  float s[R];
  for (int h = 0; h < R; ++h) mx[h] = -INFINITY;
  const int64_t ahead = 4, rb = D * (int64_t)sizeof(T);      // rows prefetched ahead, bytes per row
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t off = rp[i] * Hkv + g;
    if (i + ahead < nb) {                 // this row's K and V a few rows ahead (V: for the pass below)
      const int64_t o2 = (rp[i + ahead] * Hkv + g) * D;
      prefetch_row(kb + o2, rb);
      prefetch_row(vb + o2, rb);
    }
    kv_dot_rows<R, T>(qs, kb + off * D, D, s);
    const float f = q8 ? kv.ks[off] : 1.f;
    for (int h = 0; h < R; ++h) {
      const float x = (q8 ? s[h] * f : s[h]) * scale;
      sc[h * nb + i] = x;
      mx[h] = std::max(mx[h], x);
    }
  }
  for (int h = 0; h < R; ++h) {
    float t = 0.f;
    float* p = sc + h * nb;
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8)
      _mm256_storeu_ps(p + i, exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_set1_ps(mx[h]))));
    for (; i < nb; ++i) p[i] = std::exp(p[i] - mx[h]);
    for (i = 0; i < nb; ++i) t += p[i];
    sum[h] = t;
    if (q8)
      for (int64_t i = 0; i < nb; ++i) p[i] *= kv.vs[rp[i] * Hkv + g];   // V's scale folded into the weight
  }
  // V once per row for all R heads: 8 dims x R heads in registers over sub-blocks of rows (L2-resident)
  const int64_t SUB = 64;
  int64_t d = 0;
  for (int h = 0; h < R; ++h) std::fill(acc[h], acc[h] + D, 0.f);
  for (int64_t i0 = 0; i0 < nb; i0 += SUB) {
    const int64_t i1 = std::min(nb, i0 + SUB);
    for (d = 0; d + 8 <= D; d += 8) {
      __m256 a[R];
      for (int h = 0; h < R; ++h) a[h] = _mm256_loadu_ps(acc[h] + d);
      for (int64_t i = i0; i < i1; ++i) {
        const __m256 vv = kv_load8(vb + (rp[i] * Hkv + g) * D + d);
        for (int h = 0; h < R; ++h) a[h] = _mm256_fmadd_ps(_mm256_set1_ps(sc[h * nb + i]), vv, a[h]);
      }
      for (int h = 0; h < R; ++h) _mm256_storeu_ps(acc[h] + d, a[h]);
    }
    for (int64_t dd = d; dd < D; ++dd)
      for (int64_t i = i0; i < i1; ++i)
        for (int h = 0; h < R; ++h) acc[h][dd] += sc[h * nb + i] * kv_float(vb[(rp[i] * Hkv + g) * D + dd]);
  }
}

template <typename T>
static void attend_heads(int R, const float* const* qs, const KvView& kv, int64_t g, const int64_t* rp,
                         int64_t nb, float scale, float* sc, float* mx, float* sum, float* const* acc) {
  switch (R) {
#define QCASE(N) case N: attend_block<N, T>(qs, kv, g, rp, nb, scale, sc, mx, sum, acc); break;
    QCASE(1) QCASE(2) QCASE(3) QCASE(4) QCASE(5) QCASE(6) QCASE(7) QCASE(8)
#undef QCASE
    default: TORCH_CHECK(false, "attend_heads: 1..8 heads");
  }
}

// a normed, rotated key row (or a value row) into a cache row of type T; int8: its scale into *s
static inline void kv_store(const float* x, int64_t D, float* out, float*) { std::copy(x, x + D, out); }
static inline void kv_store(const float* x, int64_t D, c10::BFloat16* out, float*) {
  for (int64_t d = 0; d < D; ++d) out[d] = c10::BFloat16(x[d]);
}
static inline void kv_store(const float* x, int64_t D, int8_t* out, float* s) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float sc = amax / 127.f, div = std::max(sc, std::numeric_limits<float>::min());
  for (int64_t d = 0; d < D; ++d) out[d] = (int8_t)std::nearbyint(x[d] / div);
  *s = sc;
}

template <typename T>
static torch::Tensor attention_short_impl(torch::Tensor qg, torch::Tensor k, torch::Tensor v, torch::Tensor qw,
                                          torch::Tensor kw, double eps, torch::Tensor cos, torch::Tensor sin,
                                          torch::Tensor kc, torch::Tensor vc, float* ksp, float* vsp,
                                          torch::Tensor rows, torch::Tensor rcu, torch::Tensor tcu, double scale) {
  const int64_t n = qg.size(0), Hq = qg.size(1), D = qg.size(2) / 2, Hkv = k.size(1), rd = cos.size(1);
  const int64_t B = rcu.numel() - 1;
  const int64_t *rp = rows.data_ptr<int64_t>(), *rc = rcu.data_ptr<int64_t>(), *tc = tcu.data_ptr<int64_t>();
  std::vector<int64_t> seq(n);                              // the sequence of each token
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = tc[b]; r < tc[b + 1]; ++r) seq[r] = b;
  const float *qp = qg.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *qwp = qw.data_ptr<float>(), *kwp = kw.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  T *kcp = (T*)kc.data_ptr(), *vcp = (T*)vc.data_ptr();
  // the new keys (normed, rotated) and values into their rows: token r of sequence b is row S_b - T_b + j
  auto row_of = [&](int64_t r) { const int64_t b = seq[r]; return rc[b + 1] - (tc[b + 1] - r); };
  {
    std::vector<float> tmp(D), kn(D);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = rp[row_of(r)];
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t o = row * Hkv + h;
        norm_rope(kp + (r * Hkv + h) * D, kwp, (float)eps, cp + r * rd, sp + r * rd, D, rd, tmp.data(), kn.data());
        kv_store(kn.data(), D, kcp + o * D, ksp ? ksp + o : nullptr);
        kv_store(vp + (r * Hkv + h) * D, D, vcp + o * D, vsp ? vsp + o : nullptr);
      }
    }
  }
  // normed, rotated queries [n, Hq, D]
  std::vector<float> qn(n * Hq * D);
  at::parallel_for(0, n * Hq, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> tmp(D);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t r = it / Hq;
      norm_rope(qp + it * 2 * D, qwp, (float)eps, cp + r * rd, sp + r * rd, D, rd, tmp.data(), qn.data() + it * D);
    }
  });
  // tasks (token, KV head, key block); task_of[r]: the first task of token r
  std::vector<int64_t> task_of(n + 1, 0), nblk(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t S = row_of(r) - rc[seq[r]] + 1;
    nblk[r] = (S + kKeyBlock - 1) / kKeyBlock;
    task_of[r + 1] = task_of[r] + Hkv * nblk[r];
  }
  const int64_t rep = Hq / Hkv, W = D + 2;                  // per head of a task: max, sum, acc[D]
  std::vector<float> part(task_of[n] * rep * W);
  const KvView kv{kcp, vcp, ksp, vsp, Hkv, D};
  at::parallel_for(0, task_of[n], 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> sc(std::min<int64_t>(8, rep) * kKeyBlock);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r = std::upper_bound(task_of.begin(), task_of.end(), t) - task_of.begin() - 1;
      const int64_t g = (t - task_of[r]) / nblk[r], j = (t - task_of[r]) % nblk[r];
      const int64_t first = rc[seq[r]] + j * kKeyBlock, last = std::min(row_of(r), first + kKeyBlock - 1);
      for (int64_t h0 = 0; h0 < rep; h0 += 8) {
        const int R = (int)std::min<int64_t>(8, rep - h0);
        const float* qs[8];
        float mx[8], sum[8];
        float* acc[8];
        for (int h = 0; h < R; ++h) {
          qs[h] = qn.data() + (r * Hq + g * rep + h0 + h) * D;
          acc[h] = part.data() + (t * rep + h0 + h) * W + 2;
        }
        attend_heads<T>(R, qs, kv, g, rp + first, last - first + 1, (float)scale, sc.data(), mx, sum, acc);
        for (int h = 0; h < R; ++h) {
          float* ph = part.data() + (t * rep + h0 + h) * W;
          ph[0] = mx[h];
          ph[1] = sum[h];
        }
      }
    }
  });
  // merge each query head's blocks in block order, normalise, gate
  auto out = torch::empty({n, Hq * D}, qg.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n * Hq, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(D);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t r = it / Hq, h = it % Hq, g = h / rep, nb = nblk[r];
      const float* p0 = part.data() + ((task_of[r] + g * nb) * rep + h % rep) * W;   // block j at p0 + j*rep*W
      float M = -INFINITY;
      for (int64_t j = 0; j < nb; ++j) M = std::max(M, p0[j * rep * W]);
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < nb; ++j) {
        const float* pj = p0 + j * rep * W;
        const float f = std::exp(pj[0] - M);
        sum += pj[1] * f;
        for (int64_t d = 0; d < D; ++d) acc[d] += pj[2 + d] * f;
      }
      float* o = op + (r * Hq + h) * D;
      const float* gate = qp + (r * Hq + h) * 2 * D + D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] / sum * (1.f / (1.f + std::exp(-gate[d])));
    }
  });
  return out;
}

torch::Tensor gated_attention_short(torch::Tensor qg, torch::Tensor k, torch::Tensor v, torch::Tensor qw,
                                    torch::Tensor kw, double eps, torch::Tensor cos, torch::Tensor sin,
                                    torch::Tensor kc, torch::Tensor vc, torch::Tensor ks, torch::Tensor vs,
                                    torch::Tensor rows, torch::Tensor rcu, torch::Tensor tcu, double scale) {
  for (auto* t : {&qg, &k, &v, &qw, &kw, &cos, &sin})
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous(), "gated_attention_short: contiguous fp32");
  const auto kvt = kc.scalar_type();
  TORCH_CHECK((kvt == torch::kFloat32 || kvt == torch::kBFloat16 || kvt == torch::kInt8) && vc.scalar_type() == kvt &&
              kc.is_contiguous() && vc.is_contiguous(), "gated_attention_short: contiguous fp32, bf16 or int8 kc, vc");
  for (auto* t : {&rows, &rcu, &tcu})
    TORCH_CHECK(t->dtype() == torch::kInt64 && t->is_contiguous(), "rows, rcu, tcu int64");
  TORCH_CHECK(qg.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && kc.dim() == 3 && vc.sizes() == kc.sizes(),
              "qg [n,Hq,2D], k, v [n,Hkv,D], kc, vc [R,Hkv,D]");
  const int64_t n = qg.size(0), Hq = qg.size(1), D = qg.size(2) / 2, Hkv = k.size(1), rd = cos.size(1);
  TORCH_CHECK(qg.size(2) == 2 * D && k.size(0) == n && k.size(2) == D && kc.size(1) == Hkv && kc.size(2) == D &&
              Hkv > 0 && Hq % Hkv == 0 && qw.numel() == D && kw.numel() == D && cos.size(0) == n &&
              sin.sizes() == cos.sizes() && rd % 2 == 0 && rd <= D, "gated_attention_short: shapes");
  const int64_t B = rcu.numel() - 1, R = kc.size(0);
  float *ksp = nullptr, *vsp = nullptr;
  if (kvt == torch::kInt8) {
    for (auto* t : {&ks, &vs})
      TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous() && t->dim() == 2 && t->size(0) == R &&
                  t->size(1) == Hkv, "int8 kc, vc: scales ks, vs fp32 [R, Hkv]");
    ksp = ks.data_ptr<float>();
    vsp = vs.data_ptr<float>();
  }
  TORCH_CHECK(tcu.numel() == B + 1, "rcu, tcu [B+1]");
  const int64_t *rp = rows.data_ptr<int64_t>(), *rc = rcu.data_ptr<int64_t>(), *tc = tcu.data_ptr<int64_t>();
  TORCH_CHECK(tc[0] == 0 && tc[B] == n && rc[0] == 0 && rc[B] == rows.numel(), "offsets");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(tc[b + 1] >= tc[b] && rc[b + 1] - rc[b] >= tc[b + 1] - tc[b], "each sequence's rows cover its tokens");
  for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < R, "cache row out of range");
  if (kvt == torch::kFloat32)
    return attention_short_impl<float>(qg, k, v, qw, kw, eps, cos, sin, kc, vc, ksp, vsp, rows, rcu, tcu, scale);
  if (kvt == torch::kBFloat16)
    return attention_short_impl<c10::BFloat16>(qg, k, v, qw, kw, eps, cos, sin, kc, vc, ksp, vsp, rows, rcu, tcu, scale);
  return attention_short_impl<int8_t>(qg, k, v, qw, kw, eps, cos, sin, kc, vc, ksp, vsp, rows, rcu, tcu, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gated_attention_short", &gated_attention_short, "gated attention of short chunks, each query alone (decode, verification)");
  m.def("delta_decode", &delta_decode, "DeltaNet decode step: delta_prep, delta_steps, gated_rms_norm in one call");
  m.def("flush_denormals", &flush_denormals, "flush-to-zero and denormals-are-zero on every pool thread");
  m.def("rms_norm", &rms_norm, "zero-centred RMSNorm per row");
  m.def("gated_rms_norm", &gated_rms_norm, "DeltaNet output norm: w * o / rms(o) * silu(z) per head");
  m.def("delta_prep", &delta_prep, "DeltaNet conv, SiLU, q/k norms, decay and beta for T tokens per sequence");
  m.def("f32_linear", &f32_linear, "fp32 linear, each output computed alike whatever the row count");
  m.def("delta_steps", &delta_steps, "gated delta rule, T tokens per sequence, states updated in place, some kept");
  m.def("q4_linear", &q4_linear, "int4 weight-only linear");
  m.def("q4_moe_linear", &q4_moe_linear, "int4 linear over selected experts, one row per id");
  m.def("q8w_linear", &q8w_linear, "int8 weight-only linear");
  m.def("q4_dequant", &q4_dequant, "int4 -> fp32/bf16", py::arg("wq"), py::arg("sc"), py::arg("mn"),
        py::arg("gs"), py::arg("bf16"), py::arg("out") = py::none());
}
