// Memory-bound quantized GEMV / skinny GEMM for CPU decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
// Weights stream from DRAM once per call; each thread takes a contiguous slice of output rows so the
// hardware prefetcher sees one linear stream. fp32 activations and accumulation (no activation rounding).
// With AVX-512 the inner dots keep four independent accumulators: one accumulator would make the loop
// FMA-latency bound (~4 B/cycle, ~12 GB/s); four keep it memory bound. Other CPUs get the plain loops.
#include <torch/extension.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 8;  // activation rows handled per weight pass; larger M goes to GEMM paths

// sum_k x[k] * w[k] for int8 w
inline float dot_int8(const float* x, const int8_t* w, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  auto term = [&](int64_t off) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + off))));
  };
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), term(k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), term(k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), term(k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), term(k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), term(k), a0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; ++k) acc += x[k] * static_cast<float>(w[k]);
  return acc;
}

// sum_g scale[g] * sum_{j in g} (e[j] * lo(p[j]) + o[j] * hi(p[j])), hg = bytes per group
inline float dot_int4(const float* e, const float* o, const uint8_t* p, const float* scale, int64_t G, int64_t hg) {
  float total = 0.f;
  int64_t g = 0;
#if defined(__AVX512F__)
  if (hg % 16 == 0) {
    const __m512i mask = _mm512_set1_epi32(15);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t chunk = 0;
    for (; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(scale[g]);
      for (int64_t j = g * hg; j < (g + 1) * hg; j += 16, ++chunk) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        const __m512 t = _mm512_fmadd_ps(lo, _mm512_loadu_ps(e + j), _mm512_mul_ps(hi, _mm512_loadu_ps(o + j)));
        acc[chunk & 3] = _mm512_fmadd_ps(t, s, acc[chunk & 3]);
      }
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
#endif
  for (; g < G; ++g) {
    float a = 0.f;
    for (int64_t j = g * hg; j < (g + 1) * hg; ++j) a += e[j] * static_cast<float>(p[j] & 15) + o[j] * static_cast<float>(p[j] >> 4);
    total += scale[g] * a;
  }
  return total;
}

// int8, symmetric per output channel: W[n, k] = q[n, k] * scale[n]
void int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w = q + n * K;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_int8(x + m * K, w, K) * scale[n];
  }
}

// int4, asymmetric per group with float zero: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g];
// packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4. xe / xo are x's even / odd columns, xsum the per-group sums.
void int4_rows(const float* xe, const float* xo, const float* xsum, const uint8_t* p, const float* scale,
               const float* zero, float* y, int64_t M, int64_t N, int64_t K, int64_t gs) {
  const int64_t G = K / gs, half = K / 2, hg = gs / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* w = p + n * half;
    const float* s = scale + n * G;
    const float* z = zero + n * G;
    for (int64_t m = 0; m < M; ++m) {
      float offset = 0.f;  // the zero points' share: sum_g s[g] * z[g] * sum_{k in g} x[k]
      for (int64_t g = 0; g < G; ++g) offset += s[g] * z[g] * xsum[m * G + g];
      y[m * N + n] = dot_int4(xe + m * half, xo + m * half, w, s, G, hg) - offset;
    }
  }
}

}  // namespace

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "gemv_int8: x must be 2-D float32");
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.size(1) == x.size(1), "gemv_int8: q must be int8 [N, K]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv_int8: at most ", kMaxRows, " rows");
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  auto y = torch::empty({x.size(0), q.size(0)}, x.options());
  int8_rows(xc.data_ptr<float>(), qc.data_ptr<int8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(), x.size(0),
            q.size(0), x.size(1));
  return y;
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t gs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "gemv_int4: x must be 2-D float32");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.size(1) * 2 == K, "gemv_int4: packed must be uint8 [N, K/2]");
  TORCH_CHECK(K % gs == 0 && gs % 2 == 0, "gemv_int4: K must be a multiple of an even group size");
  TORCH_CHECK(M <= kMaxRows, "gemv_int4: at most ", kMaxRows, " rows");
  auto xc = x.contiguous();
  auto xe = xc.index({torch::indexing::Slice(), torch::indexing::Slice(0, torch::indexing::None, 2)}).contiguous();
  auto xo = xc.index({torch::indexing::Slice(), torch::indexing::Slice(1, torch::indexing::None, 2)}).contiguous();
  auto xsum = xc.view({M, K / gs, gs}).sum(-1).contiguous();
  auto pc = packed.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  auto y = torch::empty({M, N}, x.options());
  int4_rows(xe.data_ptr<float>(), xo.data_ptr<float>(), xsum.data_ptr<float>(), pc.data_ptr<uint8_t>(),
            sc.data_ptr<float>(), zc.data_ptr<float>(), y.data_ptr<float>(), M, N, K, gs);
  return y;
}

// Registered with the dispatcher (no Python on the call path); fake impls are added from Python.
TORCH_LIBRARY_FRAGMENT(optpass, m) {
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
