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

// int8, symmetric per output channel: W[n, k] = q[n, k] * scale[n]
void int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w = q + n * K;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_int8(x + m * K, w, K) * scale[n];
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

// Registered with the dispatcher (no Python on the call path); fake impls are added from Python.
TORCH_LIBRARY_FRAGMENT(optpass, m) {
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
}
