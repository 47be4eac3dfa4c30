// AVX-512 versions of the int4 kernels in qkernels.cpp, for CPUs that have AVX-512 F/BW/VL/DQ (Zen 4/5,
// Intel server parts); built as a separate extension with -mavx512* flags only where torch reports AVX512.
// Same stored layout and the same exact fp32 math (dequantise in registers, FMA with fp32 activations):
//   wq uint8 [N, K/2]: per 32-element sub-block, byte j holds element j (low nibble) and j+16 (high);
//   scales fp32 or fp16 [N, K/gs]; optional mins -> w = s*q + m, else w = s*(q - 8); gs a multiple of 32.
// Why a second build: on this 2-core Zen 5 machine the 16-wide version decodes the full model ~25 % faster
// (one decode step 73 ms against 95 ms, same tokens); the AVX2 build stays for CPUs without AVX-512.
//   q4_linear(x [M,K] fp32, wq, sc, mins|None, gs) -> [M,N]
//   q4_moe_linear(x [1|T,K], wq [E,N,K/2], sc [E,N,K/gs] fp32, mins|None, gs, ids int64 [T]) -> [T,N]
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>
#include <cmath>
#include <algorithm>
#include <cstring>

#include "qcommon.h"

static const int64_t kPrefetch = 4096;  // software-prefetch distance (bytes) for the M=1 two-row kernel
static const int64_t kScaleAhead = 8;   // rows ahead whose scales and mins q8_rows prefetches

// ---------------- M = 1: two output rows at a time (independent chains, shared x loads) -------
template <typename ST>
static inline void q4_m1_2rows(const float* x, const float* xsum, int64_t G, int gs,
                               const uint8_t* w0, const uint8_t* w1, const ST* s0, const ST* s1,
                               const ST* m0, const ST* m1, float* y0, float* y1) {
  const __m512i mask = _mm512_set1_epi32(0x0F);
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  float z0 = 0.f, z1 = 0.f;
  const int sub = gs / 32;
  const int64_t pf = kPrefetch;
  for (int64_t g = 0; g < G; ++g) {
    {
      // one prefetch per 64-byte line of each row, `pf` bytes ahead (lands in following rows)
      const int64_t off = g * gs / 2;
      if ((off & 63) == 0) {
        _mm_prefetch((const char*)(w0 + off + pf), _MM_HINT_T0);
        _mm_prefetch((const char*)(w1 + off + pf), _MM_HINT_T0);
      }
    }
    const float sa = ldsc<ST>(s0 + g), sb = ldsc<ST>(s1 + g);
    z0 += (m0 ? ldsc<ST>(m0 + g) : -8.f * sa) * xsum[g];
    z1 += (m1 ? ldsc<ST>(m1 + g) : -8.f * sb) * xsum[g];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int b = 0; b < sub; ++b) {
      const int64_t k0 = g * gs + b * 32;
      const __m512 xl = _mm512_loadu_ps(x + k0), xh = _mm512_loadu_ps(x + k0 + 16);
      __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w0 + k0 / 2)));
      __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w1 + k0 / 2)));
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, mask)), xl, a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, mask)), xl, a1);
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), xh, a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), xh, a1);
    }
    t0 = _mm512_fmadd_ps(a0, _mm512_set1_ps(sa), t0);
    t1 = _mm512_fmadd_ps(a1, _mm512_set1_ps(sb), t1);
  }
  *y0 = _mm512_reduce_add_ps(t0) + z0;
  *y1 = _mm512_reduce_add_ps(t1) + z1;
}

// ---------------- general M: one output row, MT activation rows -----------------------------
template <int MT, typename ST>
static inline void q4_row_mt(const float* x, int64_t K, const float* xsum, int64_t G, int gs,
                             const uint8_t* wrow, const ST* srow, const ST* mrow, float* out,
                             int64_t ldo) {
  const __m512i mask = _mm512_set1_epi32(0x0F);
  __m512 acc[MT][2];
  float z[MT];
  for (int m = 0; m < MT; ++m) { acc[m][0] = acc[m][1] = _mm512_setzero_ps(); z[m] = 0.f; }
  const int sub = gs / 32;
  for (int64_t g = 0; g < G; ++g) {
    const float s = ldsc<ST>(srow + g);
    const float mn = mrow ? ldsc<ST>(mrow + g) : -8.f * s;
    for (int m = 0; m < MT; ++m) z[m] += mn * xsum[m * G + g];
    const __m512 sv = _mm512_set1_ps(s);
    for (int b = 0; b < sub; ++b) {
      const int64_t k0 = g * gs + b * 32;
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow + k0 / 2)));
      __m512 wl = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), sv);
      __m512 wh = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sv);
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(x + m * K + k0), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(x + m * K + k0 + 16), acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + z[m];
}

template <typename ST>
static void q4_rows(const float* x, int64_t M, int64_t K, const float* xs, const uint8_t* wq,
                    const ST* sc, const ST* mn, int gs, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / gs, KB = K / 2;
  if (M == 1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2)
      q4_m1_2rows<ST>(x, xs, G, gs, wq + n * KB, wq + (n + 1) * KB, sc + n * G, sc + (n + 1) * G,
                      mn ? mn + n * G : nullptr, mn ? mn + (n + 1) * G : nullptr, y + n, y + n + 1);
    for (; n < n1; ++n)
      q4_row_mt<1, ST>(x, K, xs, G, gs, wq + n * KB, sc + n * G, mn ? mn + n * G : nullptr, y + n, N);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * KB;
    const ST* sr = sc + n * G;
    const ST* mr = mn ? mn + n * G : nullptr;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) q4_row_mt<8, ST>(x + m * K, K, xs + m * G, G, gs, wr, sr, mr, y + m * N + n, N);
    for (; m + 4 <= M; m += 4) q4_row_mt<4, ST>(x + m * K, K, xs + m * G, G, gs, wr, sr, mr, y + m * N + n, N);
    for (; m < M; ++m) q4_row_mt<1, ST>(x + m * K, K, xs + m * G, G, gs, wr, sr, mr, y + m * N + n, N);
  }
}

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc,
                        c10::optional<torch::Tensor> mn, int64_t gs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [M,K] contiguous");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.is_contiguous(), "wq uint8 contiguous");
  TORCH_CHECK(gs % 32 == 0 && x.size(1) % gs == 0, "gs");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(wq.size(1) == K / 2 && sc.size(-1) == K / gs, "shape");
  auto y = torch::empty({M, N}, x.options());
  auto xs = group_sums(x.data_ptr<float>(), M, K, gs);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (sc.dtype() == torch::kFloat32) {
    const float* s = sc.data_ptr<float>();
    const float* m = mn ? mn->data_ptr<float>() : nullptr;
    at::parallel_for(0, N / 2, 8, [&](int64_t b, int64_t e) {
      q4_rows<float>(xp, M, K, xs.data(), wp, s, m, (int)gs, yp, N, 2 * b, e == N / 2 ? N : 2 * e);
    });
  } else {
    TORCH_CHECK(sc.dtype() == torch::kFloat16, "scales fp32/fp16");
    const at::Half* s = sc.data_ptr<at::Half>();
    const at::Half* m = mn ? mn->data_ptr<at::Half>() : nullptr;
    at::parallel_for(0, N / 2, 8, [&](int64_t b, int64_t e) {
      q4_rows<at::Half>(xp, M, K, xs.data(), wp, s, m, (int)gs, yp, N, 2 * b, e == N / 2 ? N : 2 * e);
    });
  }
  return y;
}

// Grouped MoE: wq [E,N,K/2], sc and mins [E,N,K/gs] fp32 (the stored format), ids int64 [T], x [1,K]
// (broadcast) or [T,K]. Every (row t, expert ids[t]) product in one parallel region, two output rows at a
// time; an odd N ends with a single row.
torch::Tensor q4_moe_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc,
                            c10::optional<torch::Tensor> mn, int64_t gs, torch::Tensor ids) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [1|T,K] contiguous");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.is_contiguous() && wq.dim() == 3, "wq uint8 [E,N,K/2]");
  TORCH_CHECK(gs % 32 == 0 && x.size(1) % gs == 0, "gs");
  TORCH_CHECK(sc.dtype() == torch::kFloat32 && sc.is_contiguous() &&
              (!mn || (mn->dtype() == torch::kFloat32 && mn->is_contiguous())), "scales and mins: contiguous fp32");
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.is_contiguous(), "ids int64");
  const int64_t T = ids.numel(), K = x.size(1), N = wq.size(1), G = K / gs, KB = K / 2, NP = (N + 1) / 2;
  TORCH_CHECK(wq.size(2) == K / 2 && sc.size(-1) == G, "shape");
  const bool bc = x.size(0) == 1;
  TORCH_CHECK(bc || x.size(0) == T, "x must be [1,K] or [T,K]");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < wq.size(0), "expert id out of range");
  auto y = torch::empty({T, N}, x.options());
  auto xs = group_sums(x.data_ptr<float>(), x.size(0), K, gs);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  const float* m = mn ? mn->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T * NP, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / NP, n = (i % NP) * 2, r = id[t] * N + n;
      const float* xr = xp + (bc ? 0 : t * K);
      const float* xsr = xs.data() + (bc ? 0 : t * G);
      if (n + 1 < N)
        q4_m1_2rows<float>(xr, xsr, G, (int)gs, wp + r * KB, wp + (r + 1) * KB, s + r * G, s + (r + 1) * G,
                           m ? m + r * G : nullptr, m ? m + (r + 1) * G : nullptr, yp + t * N + n,
                           yp + t * N + n + 1);
      else
        q4_row_mt<1, float>(xr, K, xsr, G, (int)gs, wp + r * KB, s + r * G, m ? m + r * G : nullptr,
                            yp + t * N + n, N);
    }
  });
  return y;
}


// ---------------- prefill: int8 activations x int4 weights with AVX-512 VNNI ----------------------------
// Activations are quantized per row and per weight group: a = max|x| / 127, xq = round(x / a) (int8), so
//   y[m,n] = sum_g a[m,g] * ( s[n,g] * sum_k q[n,k] xq[m,k]  +  mn[n,g] * sum_k xq[m,k] )
// where the inner sum over the group is exact in int32 (vpdpbusd: uint8 codes times int8 activations).
// Why: prefill is bound by multiply throughput, not memory; one vpdpbusd does 64 multiply-adds where an
// fp32 FMA does 16. Weights stay as stored: each thread copies a panel of 32 rows into a transposed
// scratch (16 rows x 4 bytes per 64-byte vector) once and runs every activation row across it.
#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

bool has_vnni() { return __builtin_cpu_supports("avx512vnni"); }

// xq [M,K] int8; xa[m,g] = a; xb[m,g] = a * sum(xq over the group)
Q8_TARGET static void quantize_rows(const float* x, int64_t M, int64_t K, int gs, int8_t* xq, float* xa,
                                    float* xb) {
  const int64_t G = K / gs;
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float* xr = x + m * K + g * gs;
        __m512 mx = _mm512_setzero_ps();
        for (int k = 0; k < gs; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
        const float amax = _mm512_reduce_max_ps(mx);
        const float a = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < gs; k += 16) {
          // round half to even, as torch.round
          __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv));
          q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
          sum = _mm512_add_epi32(sum, q);
          _mm_storeu_si128((__m128i*)(xq + m * K + g * gs + k), _mm512_cvtepi32_epi8(q));
        }
        xa[m * G + g] = a;
        xb[m * G + g] = a * (float)_mm512_reduce_add_epi32(sum);
      }
  });
}

// rows n0.. n0+31 of wq [N, K/2] -> wt [K/8][32] dwords (row r's dword j at wt[j*32 + r]); scales and mins
// -> [G][32]; rows past N are zero
static void panel(const uint8_t* wq, const float* sc, const float* mn, int64_t N, int64_t K, int64_t G,
                  int64_t n0, uint32_t* wt, float* st, float* mt) {
  const int64_t D = K / 8;
  for (int r = 0; r < 32; ++r) {
    const int64_t n = n0 + r;
    if (n < N) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(wq + n * (K / 2));
      for (int64_t j = 0; j < D; ++j) wt[j * 32 + r] = src[j];
      for (int64_t g = 0; g < G; ++g) {
        st[g * 32 + r] = sc[n * G + g];
        mt[g * 32 + r] = mn ? mn[n * G + g] : -8.f * sc[n * G + g];
      }
    } else {
      for (int64_t j = 0; j < D; ++j) wt[j * 32 + r] = 0;
      for (int64_t g = 0; g < G; ++g) st[g * 32 + r] = mt[g * 32 + r] = 0.f;
    }
  }
}

// MR activation rows x the 32 rows of one panel
template <int MR>
Q8_TARGET static inline void q8_tile(const uint32_t* wt, const float* st, const float* mt, const int8_t* xq,
                                     int64_t K, const float* xa, const float* xb, int64_t G, int gs, float* y,
                                     int64_t ldy, int nvalid) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 f[MR][2];
  for (int t = 0; t < MR; ++t) f[t][0] = f[t][1] = _mm512_setzero_ps();
  const int steps = gs / 8;
  for (int64_t g = 0; g < G; ++g) {
    __m512i lo[MR][2], hi[MR][2];
    for (int t = 0; t < MR; ++t)
      lo[t][0] = lo[t][1] = hi[t][0] = hi[t][1] = _mm512_setzero_si512();
    const uint32_t* w = wt + g * steps * 32;
    const int8_t* xg = xq + g * gs;
    for (int s = 0; s < steps; ++s) {
      const __m512i w0 = _mm512_loadu_si512(w + s * 32), w1 = _mm512_loadu_si512(w + s * 32 + 16);
      const __m512i l0 = _mm512_and_si512(w0, mask), h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), mask);
      const __m512i l1 = _mm512_and_si512(w1, mask), h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), mask);
      const int kl = (s >> 2) * 32 + (s & 3) * 4;            // low nibbles: k = kl..kl+3, high: kl+16..
      for (int t = 0; t < MR; ++t) {
        const __m512i xl = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xg + t * K + kl));
        const __m512i xh = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xg + t * K + kl + 16));
        lo[t][0] = _mm512_dpbusd_epi32(lo[t][0], l0, xl);
        lo[t][1] = _mm512_dpbusd_epi32(lo[t][1], l1, xl);
        hi[t][0] = _mm512_dpbusd_epi32(hi[t][0], h0, xh);
        hi[t][1] = _mm512_dpbusd_epi32(hi[t][1], h1, xh);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(st + g * 32), s1 = _mm512_loadu_ps(st + g * 32 + 16);
    const __m512 m0 = _mm512_loadu_ps(mt + g * 32), m1 = _mm512_loadu_ps(mt + g * 32 + 16);
    for (int t = 0; t < MR; ++t) {
      const __m512 a = _mm512_set1_ps(xa[t * G + g]), b = _mm512_set1_ps(xb[t * G + g]);
      const __m512 d0 = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[t][0], hi[t][0]));
      const __m512 d1 = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[t][1], hi[t][1]));
      f[t][0] = _mm512_fmadd_ps(m0, b, _mm512_fmadd_ps(d0, _mm512_mul_ps(s0, a), f[t][0]));
      f[t][1] = _mm512_fmadd_ps(m1, b, _mm512_fmadd_ps(d1, _mm512_mul_ps(s1, a), f[t][1]));
    }
  }
  const __mmask16 k0 = nvalid >= 16 ? 0xFFFF : (__mmask16)((1u << nvalid) - 1);
  const __mmask16 k1 = nvalid >= 32 ? 0xFFFF : nvalid <= 16 ? 0 : (__mmask16)((1u << (nvalid - 16)) - 1);
  for (int t = 0; t < MR; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, k0, f[t][0]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, k1, f[t][1]);
  }
}

// y[M,N] for one weight (panels p0..p1 of 32 rows), the activations already quantized
Q8_TARGET static void q8_panels(const int8_t* xq, const float* xa, const float* xb, int64_t M, int64_t K,
                                int gs, const uint8_t* wq, const float* sc, const float* mn, int64_t N,
                                float* y, int64_t p0, int64_t p1) {
  const int64_t G = K / gs;
  std::vector<uint32_t> wt(K / 8 * 32);
  std::vector<float> st(G * 32), mt(G * 32);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * 32;
    const int nv = (int)std::min<int64_t>(32, N - n0);
    panel(wq, sc, mn, N, K, G, n0, wt.data(), st.data(), mt.data());
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      q8_tile<4>(wt.data(), st.data(), mt.data(), xq + m * K, K, xa + m * G, xb + m * G, G, gs, y + m * N + n0, N, nv);
    for (; m < M; ++m)
      q8_tile<1>(wt.data(), st.data(), mt.data(), xq + m * K, K, xa + m * G, xb + m * G, G, gs, y + m * N + n0, N, nv);
  }
}

// the stored parts of an int4 weight (fp32 scales, optional mins), checked against x [M,K] once
struct Q4W {
  const uint8_t* q;
  const float* s;
  const float* m;
};

static Q4W q4_parts(const char* kernel, const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sc,
                    const c10::optional<torch::Tensor>& mn, int64_t gs, int64_t wdim) {
  TORCH_CHECK(has_vnni(), kernel, " needs AVX-512 VNNI");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [M,K] contiguous");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.is_contiguous() && wq.dim() == wdim, "wq uint8 contiguous, ",
              wdim, " dims");
  TORCH_CHECK(gs % 32 == 0 && x.size(1) % gs == 0, "gs");
  TORCH_CHECK(sc.dtype() == torch::kFloat32 && sc.is_contiguous() &&
              (!mn || (mn->dtype() == torch::kFloat32 && mn->is_contiguous())), "scales and mins: contiguous fp32");
  TORCH_CHECK(wq.size(-1) == x.size(1) / 2 && sc.size(-1) == x.size(1) / gs, "shape");
  return {wq.data_ptr<uint8_t>(), sc.data_ptr<float>(), mn ? mn->data_ptr<float>() : nullptr};
}

// x [M,K] fp32 -> (xq int8 [M,K], xa fp32 [M,K/gs], xb fp32 [M,K/gs])
static std::vector<torch::Tensor> q8_quantize(torch::Tensor x, int64_t gs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [M,K] contiguous");
  TORCH_CHECK(gs % 16 == 0 && x.size(1) % gs == 0, "gs");
  const int64_t M = x.size(0), K = x.size(1), G = K / gs;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xa = torch::empty({M, G}, x.options()), xb = torch::empty({M, G}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, (int)gs, xq.data_ptr<int8_t>(), xa.data_ptr<float>(), xb.data_ptr<float>());
  return {xq, xa, xb};
}

torch::Tensor q4q8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor sc, c10::optional<torch::Tensor> mn,
                          int64_t gs) {
  const Q4W w = q4_parts("q4q8_linear", x, wq, sc, mn, gs, 2);
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0), P = (N + 31) / 32;
  auto q = q8_quantize(x, gs);
  auto y = torch::empty({M, N}, x.options());
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    q8_panels(q[0].data_ptr<int8_t>(), q[1].data_ptr<float>(), q[2].data_ptr<float>(), M, K, (int)gs,
              w.q, w.s, w.m, N, y.data_ptr<float>(), b, e);
  });
  return y;
}

// ---------------- decode: the same int8-activation math, weights read straight from the stored rows ----------
// For few activation rows (decode, small batches) the panel copy would cost more than the product: each
// 64-byte load of a stored row is one 128-element chunk (4 sub-blocks); its low nibbles are elements
// 32b+j and its high nibbles 32b+16+j of sub-block b, so the activations are arranged once per call in that
// order (xl, xh: 64 bytes each per chunk) and every chunk is two vpdpbusd per activation row.
// Needs gs a multiple of 128 (one scale per whole chunk); the default group is 128.

// xq [M,K] natural order -> xr [M][K/128][2][64]: per chunk the 4 low-nibble halves, then the 4 high ones
static void arrange_chunks(const int8_t* xq, int64_t M, int64_t K, int8_t* xr) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 128; ++c) {
      const int8_t* src = xq + m * K + c * 128;
      int8_t* dst = xr + (m * (K / 128) + c) * 128;
      for (int b = 0; b < 4; ++b) {
        std::memcpy(dst + 16 * b, src + 32 * b, 16);
        std::memcpy(dst + 64 + 16 * b, src + 32 * b + 16, 16);
      }
    }
}

// NR stored weight rows (consecutive in memory at stride KB, or given) times MT arranged activation rows
template <int MT>
Q8_TARGET static inline void q8_rows(const int8_t* xr, int64_t K, const float* xa, const float* xb, int64_t G,
                                     int gs, const uint8_t* w, const float* s, const float* mn, float* y,
                                     int64_t ldy) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const int cpg = gs / 128;                                   // chunks per group
  const int64_t C = K / 128;
  __m512 f[MT];
  float z[MT];
  for (int t = 0; t < MT; ++t) { f[t] = _mm512_setzero_ps(); z[t] = 0.f; }
  // the scales and mins of a row a few rows ahead (separate arrays: their own streams)
  _mm_prefetch((const char*)(s + kScaleAhead * G), _MM_HINT_T0);
  if (mn) _mm_prefetch((const char*)(mn + kScaleAhead * G), _MM_HINT_T0);
  for (int64_t g = 0; g < G; ++g) {
    __m512i a[MT];
    for (int t = 0; t < MT; ++t) a[t] = _mm512_setzero_si512();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ch = g * cpg + c;
      _mm_prefetch((const char*)(w + ch * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + ch * 64);
      const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      for (int t = 0; t < MT; ++t) {
        const int8_t* xc = xr + (t * C + ch) * 128;
        a[t] = _mm512_dpbusd_epi32(a[t], lo, _mm512_loadu_si512(xc));
        a[t] = _mm512_dpbusd_epi32(a[t], hi, _mm512_loadu_si512(xc + 64));
      }
    }
    const float sg = s[g], mg = mn ? mn[g] : -8.f * sg;
    for (int t = 0; t < MT; ++t) {
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[t]), _mm512_set1_ps(sg * xa[t * G + g]), f[t]);
      z[t] += mg * xb[t * G + g];
    }
  }
  for (int t = 0; t < MT; ++t) y[t * ldy] = _mm512_reduce_add_ps(f[t]) + z[t];
}

// one stored weight row against all M activation rows, in blocks of 4
Q8_TARGET static inline void q8_row_all(const int8_t* xr, int64_t M, int64_t K, const float* xa, const float* xb,
                                        int64_t G, int gs, const uint8_t* w, const float* s, const float* mn,
                                        float* y, int64_t ldy) {
  const int64_t C = K / 128;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) q8_rows<4>(xr + m * C * 128, K, xa + m * G, xb + m * G, G, gs, w, s, mn, y + m * ldy, ldy);
  for (; m + 2 <= M; m += 2) q8_rows<2>(xr + m * C * 128, K, xa + m * G, xb + m * G, G, gs, w, s, mn, y + m * ldy, ldy);
  for (; m < M; ++m) q8_rows<1>(xr + m * C * 128, K, xa + m * G, xb + m * G, G, gs, w, s, mn, y + m * ldy, ldy);
}

// activations of one call, quantized (q8_quantize) and arranged (arrange_chunks)
struct Q8Act {
  torch::Tensor xr, xa, xb;                    // owners; the pointers below are read in the inner loops
  const int8_t* rp;
  const float *ap, *bp;
  const int8_t* r(int64_t row, int64_t K) const { return rp + row * K; }
  const float* a(int64_t row, int64_t G) const { return ap + row * G; }
  const float* b(int64_t row, int64_t G) const { return bp + row * G; }
};

static Q8Act q8_prepare(const torch::Tensor& x, int64_t gs) {
  TORCH_CHECK(gs % 128 == 0, "gs a multiple of 128");
  auto q = q8_quantize(x, gs);
  const int64_t M = x.size(0), K = x.size(1);
  auto xr = torch::empty({M, K}, q[0].options());
  arrange_chunks(q[0].data_ptr<int8_t>(), M, K, xr.data_ptr<int8_t>());
  return {xr, q[1], q[2], xr.data_ptr<int8_t>(), q[1].data_ptr<float>(), q[2].data_ptr<float>()};
}

torch::Tensor q4q8_gemv(torch::Tensor x, torch::Tensor wq, torch::Tensor sc, c10::optional<torch::Tensor> mn,
                        int64_t gs) {
  const Q4W w = q4_parts("q4q8_gemv", x, wq, sc, mn, gs, 2);
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0), G = K / gs, KB = K / 2;
  const Q8Act a = q8_prepare(x, gs);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      q8_row_all(a.r(0, K), M, K, a.a(0, G), a.b(0, G), G, (int)gs, w.q + n * KB, w.s + n * G,
                 w.m ? w.m + n * G : nullptr, yp + n, N);
  });
  return y;
}

// grouped experts, as q4_moe_linear: row t of x (or its only row) times expert ids[t]
torch::Tensor q4q8_moe(torch::Tensor x, torch::Tensor wq, torch::Tensor sc, c10::optional<torch::Tensor> mn,
                       int64_t gs, torch::Tensor ids) {
  const Q4W w = q4_parts("q4q8_moe", x, wq, sc, mn, gs, 3);
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.is_contiguous(), "ids int64");
  const int64_t T = ids.numel(), K = x.size(1), N = wq.size(1), G = K / gs, KB = K / 2;
  const bool bc = x.size(0) == 1;
  TORCH_CHECK(bc || x.size(0) == T, "x must be [1,K] or [T,K]");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < wq.size(0), "expert id out of range");
  const Q8Act a = q8_prepare(x, gs);
  auto y = torch::empty({T, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T * N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / N, n = i % N, r = id[t] * N + n, xi = bc ? 0 : t;
      q8_rows<1>(a.r(xi, K), K, a.a(xi, G), a.b(xi, G), G, (int)gs, w.q + r * KB, w.s + r * G,
                 w.m ? w.m + r * G : nullptr, yp + t * N + n, N);
    }
  });
  return y;
}

// grouped experts for prefill: x [T,K] rows sorted by expert, offsets [E+1] (rows of expert e are
// offsets[e] .. offsets[e+1]-1). Each used expert's stored weight rows are read once for all its activation
// rows (q8_row_all, in blocks of 4), and every (expert, output row) pair of the step is one parallel region:
// no loop over experts outside the kernel.
torch::Tensor q4q8_moe_sorted(torch::Tensor x, torch::Tensor wq, torch::Tensor sc, c10::optional<torch::Tensor> mn,
                              int64_t gs, torch::Tensor offsets) {
  const Q4W w = q4_parts("q4q8_moe_sorted", x, wq, sc, mn, gs, 3);
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous() && offsets.numel() == wq.size(0) + 1,
              "offsets int64 [E+1]");
  const int64_t T = x.size(0), K = x.size(1), N = wq.size(1), G = K / gs, KB = K / 2, E = wq.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == T, "offsets must run from 0 to the row count");
  std::vector<int64_t> used;                                  // experts with rows
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], "offsets must not decrease");
    if (off[e + 1] > off[e]) used.push_back(e);
  }
  const Q8Act a = q8_prepare(x, gs);
  auto y = torch::empty({T, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t U = (int64_t)used.size();
  at::parallel_for(0, U * N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t ex = used[i / N], n = i % N, r = ex * N + n, t0 = off[ex];
      q8_row_all(a.r(t0, K), off[ex + 1] - t0, K, a.a(t0, G), a.b(t0, G), G, (int)gs, w.q + r * KB, w.s + r * G,
                 w.m ? w.m + r * G : nullptr, yp + t0 * N + n, N);
    }
  });
  return y;
}


// ---------------- the whole sparse-MoE block of a decode-sized step in one call ---------------------------
// Per row r of x [N, H] (N small: decode, speculative verification), what layers/moe.py SparseMoE computes:
//   p = softmax(router x_r) over E experts (fp32), the top k of them (ties: the lower id), weights renormalised;
//   routed_r = sum_j w_j * down_{e_j}( silu(gate_{e_j} x_r) * up_{e_j} x_r )           (j in rank order)
//   out_r = routed_r + sigmoid(shared_gate . x_r) * down_s( silu(gate_s x_r) * up_s x_r )
// with the int8-activation int4 kernels of q4q8_moe for every projection (x_r quantized once for the router-
// independent ones), the router through f32_dot_rows (as f32_linear). Three parallel regions (router and
// shared gate/up; routed gate/up; all down projections) instead of ~25 tensor ops and kernel calls. Each row
// is computed alike whatever N. Weights: {q, scale, min} as stored (scales fp32, gs a multiple of 128).
struct Q4Mat { const uint8_t* q; const float* s; const float* m; int64_t rows, K, G; };

static Q4Mat q4_mat(const std::vector<torch::Tensor>& t, int64_t K, int64_t gs, int64_t dims, const char* what) {
  TORCH_CHECK(t.size() == 3, what, ": q, scale, min");
  TORCH_CHECK(t[0].dtype() == torch::kUInt8 && t[0].is_contiguous() && t[0].dim() == dims && t[0].size(-1) == K / 2,
              what, ": q uint8 [.., ", K / 2, "] contiguous");
  for (int i = 1; i < 3; ++i)
    TORCH_CHECK(t[i].dtype() == torch::kFloat32 && t[i].is_contiguous() && t[i].size(-1) == K / gs, what,
                ": scale and min fp32 [.., K/gs] contiguous");
  return {t[0].data_ptr<uint8_t>(), t[1].data_ptr<float>(), t[2].data_ptr<float>(), t[0].size(-2), K, K / gs};
}

// rows [r0, r1) of weight matrix `w` (or expert e of a stack: row offset e * rows) times activation row `row`
Q8_TARGET static inline void q8_span(const Q8Act& a, int64_t row, const Q4Mat& w, int64_t e, int64_t r0, int64_t r1,
                                     int gs, float* y) {
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t r = e * w.rows + n;
    q8_rows<1>(a.r(row, w.K), w.K, a.a(row, w.G), a.b(row, w.G), w.G, gs, w.q + r * (w.K / 2), w.s + r * w.G,
               w.m + r * w.G, y + n, 0);
  }
}

std::vector<torch::Tensor> moe_decode(torch::Tensor x, torch::Tensor router, int64_t topk,
                                      std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
                                      std::vector<torch::Tensor> s_gate, std::vector<torch::Tensor> s_up,
                                      std::vector<torch::Tensor> s_down, torch::Tensor s_gate_w, int64_t gs) {
  TORCH_CHECK(has_vnni(), "moe_decode needs AVX-512 VNNI");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [N,H] contiguous");
  TORCH_CHECK(gs % 128 == 0, "gs a multiple of 128");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(router.dtype() == torch::kFloat32 && router.is_contiguous() && router.dim() == 2 && router.size(1) == H,
              "router fp32 [E,H]");
  TORCH_CHECK(s_gate_w.dtype() == torch::kFloat32 && s_gate_w.is_contiguous() && s_gate_w.numel() == H,
              "shared expert gate fp32 [1,H]");
  const int64_t E = router.size(0);
  TORCH_CHECK(topk >= 1 && topk <= E, "top k in 1..E");
  const Q4Mat gu = q4_mat(gate_up, H, gs, 3, "gate_up"), sg = q4_mat(s_gate, H, gs, 2, "shared gate"),
              su = q4_mat(s_up, H, gs, 2, "shared up");
  TORCH_CHECK(gate_up[0].size(0) == E && gu.rows % 2 == 0, "gate_up [E, 2I, H/2]");
  const int64_t I = gu.rows / 2, Is = sg.rows;
  TORCH_CHECK(su.rows == Is, "shared gate and up: the same rows");
  const Q4Mat dn = q4_mat(down, I, gs, 3, "down"), sd = q4_mat(s_down, Is, gs, 2, "shared down");
  TORCH_CHECK(down[0].size(0) == E && dn.rows == H && sd.rows == H, "down [E, H, I/2], shared down [H, Is/2]");
  const int64_t P = N * topk;                                   // (row, chosen expert) pairs
  const float* xp = x.data_ptr<float>();
  const float* rw = router.data_ptr<float>();
  const float* sgw = s_gate_w.data_ptr<float>();
  auto opts = x.options();
  auto logits = torch::empty({N, E}, opts), sh = torch::empty({N, 2 * Is}, opts), sgl = torch::empty({N}, opts);
  float *lp = logits.data_ptr<float>(), *shp = sh.data_ptr<float>(), *sglp = sgl.data_ptr<float>();
  const Q8Act ax = q8_prepare(x, gs);
  // 1. router logits (blocks of 2 fp32 rows: 16 KB, about what a block of 16 int4 rows reads, so the two
  // threads' halves of the region read alike), shared gate and up (blocks of 16 rows), shared gate logit
  const int64_t bE = (E + 1) / 2, bS = (Is + 15) / 16, per1 = bE + 2 * bS + 1;
  at::parallel_for(0, N * per1, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = i / per1, j = i % per1;
      const float* xr[1] = {xp + r * H};
      if (j < bE) {
        for (int64_t e = j * 2; e < std::min(E, j * 2 + 2); ++e) {
          float* o[1] = {lp + r * E + e};
          f32_dot_rows<1>(xr, rw + e * H, H, o);
        }
      } else if (j < bE + 2 * bS) {
        const int64_t b = j - bE, up = b / bS, r0 = (b % bS) * 16;
        q8_span(ax, r, up ? su : sg, 0, r0, std::min(Is, r0 + 16), (int)gs, shp + r * 2 * Is + up * Is);
      } else {
        float* o[1] = {sglp + r};
        f32_dot_rows<1>(xr, sgw, H, o);
      }
    }
  });
  // 2. softmax, top k, renormalise (per row, in fp32)
  auto ids = torch::empty({N, topk}, opts.dtype(torch::kInt64));
  auto wts = torch::empty({N, topk}, opts);
  int64_t* idp = ids.data_ptr<int64_t>();
  float* wp = wts.data_ptr<float>();
  std::vector<float> p(E);
  std::vector<int64_t> order(E);
  for (int64_t r = 0; r < N; ++r) {
    const float* l = lp + r * E;
    float mx = l[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) { p[e] = std::exp(l[e] - mx); sum += p[e]; }
    for (int64_t e = 0; e < E; ++e) { p[e] /= sum; order[e] = e; }
    std::partial_sort(order.begin(), order.begin() + topk, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float ws = 0.f;
    for (int64_t j = 0; j < topk; ++j) ws += p[order[j]];
    for (int64_t j = 0; j < topk; ++j) { idp[r * topk + j] = order[j]; wp[r * topk + j] = p[order[j]] / ws; }
  }
  // 3. routed gate and up: per pair, blocks of 16 of the 2I rows
  auto gux = torch::empty({P, 2 * I}, opts);
  float* gup = gux.data_ptr<float>();
  const int64_t bG = (2 * I + 15) / 16;
  at::parallel_for(0, P * bG, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t pr = i / bG, r0 = (i % bG) * 16;
      q8_span(ax, pr / topk, gu, idp[pr], r0, std::min(2 * I, r0 + 16), (int)gs, gup + pr * 2 * I);
    }
  });
  // 4. silu(gate) * up for the pairs and the shared expert, then all down projections
  auto hr = torch::empty({P, I}, opts), hs = torch::empty({N, Is}, opts);
  float *hrp = hr.data_ptr<float>(), *hsp = hs.data_ptr<float>();
  at::parallel_for(0, P + N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t pr = lo; pr < hi; ++pr) {
      if (pr < P)
        for (int64_t j = 0; j < I; ++j) hrp[pr * I + j] = silu(gup[pr * 2 * I + j]) * gup[pr * 2 * I + I + j];
      else
        for (int64_t j = 0, r = pr - P; j < Is; ++j) hsp[r * Is + j] = silu(shp[r * 2 * Is + j]) * shp[r * 2 * Is + Is + j];
    }
  });
  const Q8Act ar = q8_prepare(hr, gs), as = q8_prepare(hs, gs);
  auto yr = torch::empty({P, H}, opts), ys = torch::empty({N, H}, opts);
  float *yrp = yr.data_ptr<float>(), *ysp = ys.data_ptr<float>();
  const int64_t bH = (H + 15) / 16;
  at::parallel_for(0, (P + N) * bH, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t pr = i / bH, r0 = (i % bH) * 16, r1 = std::min(H, r0 + 16);
      if (pr < P) q8_span(ar, pr, dn, idp[pr], r0, r1, (int)gs, yrp + pr * H);
      else q8_span(as, pr - P, sd, 0, r0, r1, (int)gs, ysp + (pr - P) * H);
    }
  });
  // 5. weighted sum of the routed outputs in rank order, plus the gated shared expert
  auto out = torch::empty({N, H}, opts);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * bH, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = i / bH, h0 = (i % bH) * 16, h1 = std::min(H, h0 + 16);
      const float gate = 1.f / (1.f + std::exp(-sglp[r]));
      float* o = op + r * H;
      for (int64_t h = h0; h < h1; ++h) {
        float acc = 0.f;
        for (int64_t j = 0; j < topk; ++j) acc += wp[r * topk + j] * yrp[(r * topk + j) * H + h];
        o[h] = acc + gate * ysp[r * H + h];
      }
    }
  });
  return {out, ids, wts};
}


// ---------------- several linears of one input in one call (decode-sized steps) ---------------------------
// x [M, K] fp32 times each int4 weight in `q4` ({q, scale, min}, one group size) and each fp32 weight in
// `f32` ([N, K]): the outputs of q4q8_gemv and f32_linear, bit for bit (the same per-row arithmetic), with
// x quantized once and every output row of every weight in one parallel region. Returns the int4 outputs,
// then the fp32 ones. A layer's input projections (DeltaNet: qkv, z, a, b; attention: q, k, v) read their
// weights back to back instead of in four calls with tensor ops between them.
std::vector<torch::Tensor> multi_linear(torch::Tensor x, std::vector<std::vector<torch::Tensor>> q4,
                                        std::vector<torch::Tensor> f32, int64_t gs) {
  TORCH_CHECK(has_vnni(), "multi_linear needs AVX-512 VNNI");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x fp32 [M,K] contiguous");
  TORCH_CHECK(gs % 128 == 0, "gs a multiple of 128");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<Q4Mat> mats;
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> first{0};                             // first block of each weight
  for (auto& t : q4) {
    mats.push_back(q4_mat(t, K, gs, 2, "multi_linear int4 weight"));
    outs.push_back(torch::empty({M, mats.back().rows}, x.options()));
    first.push_back(first.back() + (mats.back().rows + 15) / 16);
  }
  for (auto& w : f32) {
    TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
                "multi_linear fp32 weight [N,K] contiguous");
    outs.push_back(torch::empty({M, w.size(0)}, x.options()));
    first.push_back(first.back() + (w.size(0) + 15) / 16);
  }
  const Q8Act a = q8_prepare(x, gs);
  const float* xp = x.data_ptr<float>();
  const int64_t nq = (int64_t)mats.size();
  at::parallel_for(0, first.back(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t j = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
      float* y = outs[j].data_ptr<float>();
      const int64_t N = outs[j].size(1), n0 = (i - first[j]) * 16, n1 = std::min(N, n0 + 16);
      if (j < nq) {
        const Q4Mat& w = mats[j];
        for (int64_t n = n0; n < n1; ++n)
          q8_row_all(a.r(0, K), M, K, a.a(0, w.G), a.b(0, w.G), w.G, (int)gs, w.q + n * (K / 2), w.s + n * w.G,
                     w.m + n * w.G, y + n, N);
      } else {
        const float* wp = f32[j - nq].data_ptr<float>();
        for (int64_t n = n0; n < n1; ++n) {
          int64_t m = 0;
          for (; m + 4 <= M; m += 4) {
            const float* xs[4] = {xp + m * K, xp + (m + 1) * K, xp + (m + 2) * K, xp + (m + 3) * K};
            float* os[4] = {y + m * N + n, y + (m + 1) * N + n, y + (m + 2) * N + n, y + (m + 3) * N + n};
            f32_dot_rows<4>(xs, wp + n * K, K, os);
          }
          for (; m < M; ++m) {
            const float* xs[1] = {xp + m * K};
            float* os[1] = {y + m * N + n};
            f32_dot_rows<1>(xs, wp + n * K, K, os);
          }
        }
      }
    }
  });
  return outs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("multi_linear", &multi_linear, "several int4 and fp32 linears of one input in one call (decode)");
  m.def("moe_decode", &moe_decode, "the sparse-MoE block of a decode-sized step in one call (AVX-512 VNNI)");
  m.def("q4q8_moe_sorted", &q4q8_moe_sorted, "grouped experts over expert-sorted rows, int8 activations, prefill");
  m.def("q4_linear", &q4_linear, "int4 weight-only linear (AVX-512)");
  m.def("has_vnni", &has_vnni, "whether this CPU has AVX-512 VNNI");
  m.def("q4q8_linear", &q4q8_linear, "int4 weights x int8 activations (AVX-512 VNNI), for prefill");
  m.def("q4q8_gemv", &q4q8_gemv, "int4 weights x int8 activations for few rows (AVX-512 VNNI), decode");
  m.def("q4q8_moe", &q4q8_moe, "grouped experts, int8 activations (AVX-512 VNNI), decode");
  m.def("q4_moe_linear", &q4_moe_linear, "int4 linear over selected experts, one row per id (AVX-512)");
}
