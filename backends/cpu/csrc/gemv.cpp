// Memory-bound quantized GEMV / skinny GEMM for CPU decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
// Weights stream from DRAM once per call; each thread takes a contiguous slice of output rows so the
// hardware prefetcher sees one linear stream. fp32 activations and accumulation (no activation rounding).
// With AVX-512 the inner dots keep four independent accumulators: one accumulator would make the loop
// FMA-latency bound (~4 B/cycle, ~12 GB/s); four keep it memory bound. Other CPUs get the plain loops.
#include <torch/extension.h>
#include <omp.h>

#include <cstring>
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

// fp32 -> bf16 bits, round to nearest even (integer ops only, so the loops below vectorize)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// out[n, :] = q[n, :] * scale[n]  (int8, symmetric per output channel)
void dequant_int8_rows(const int8_t* q, const float* scale, uint16_t* out, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float s = scale[n];
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = to_bf16(static_cast<float>(q[n * K + k]) * s);
  }
}

// out[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = k / group; q packed two per byte, low nibble first
void dequant_int4_rows(const uint8_t* packed, const float* scale, const float* zero, uint16_t* out, int64_t N,
                       int64_t K, int64_t group) {
  const int64_t groups = K / group, half = group / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g], z = zero[n * groups + g];
      // 16 codes per group: a 16-entry bf16 table replaces the float math per element
      uint16_t lut[16];
      for (int j = 0; j < 16; ++j) lut[j] = to_bf16((static_cast<float>(j) - z) * s);
      const uint8_t* src = packed + n * (K / 2) + g * half;
      uint16_t* dst = out + n * K + g * group;
      for (int64_t i = 0; i < half; ++i) {
        dst[2 * i] = lut[src[i] & 0x0F];
        dst[2 * i + 1] = lut[src[i] >> 4];
      }
    }
  }
}

}  // namespace

// Writes the bf16 weight into `out` (a caller-owned workspace, so a prefill GEMM allocates no weight-sized
// temporaries: freshly mmapped pages made the eager dequantize ~3x slower than the GEMM it feeds).
torch::Tensor& dequant_bf16_(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& scale,
                             const std::optional<torch::Tensor>& zero, int64_t group_size) {
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() && out.dim() == 2,
              "dequant_bf16_: out must be a contiguous 2-D bf16 tensor");
  auto qc = q.contiguous(), sc = scale.contiguous().to(torch::kFloat);
  const int64_t N = out.size(0), K = out.size(1);
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  if (q.scalar_type() == torch::kChar) {
    TORCH_CHECK(q.size(0) == N && q.size(1) == K && sc.numel() == N, "dequant_bf16_: int8 shapes disagree");
    dequant_int8_rows(qc.data_ptr<int8_t>(), sc.data_ptr<float>(), dst, N, K);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kByte && zero.has_value(), "dequant_bf16_: int4 needs packed uint8 and zero");
    TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "dequant_bf16_: bad group size");
    auto zc = zero->contiguous().to(torch::kFloat);
    TORCH_CHECK(q.size(0) == N && q.size(1) * 2 == K && sc.numel() == N * (K / group_size) && zc.numel() == sc.numel(),
                "dequant_bf16_: int4 shapes disagree");
    dequant_int4_rows(qc.data_ptr<uint8_t>(), sc.data_ptr<float>(), zc.data_ptr<float>(), dst, N, K, group_size);
  }
  return out;
}

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
  m.def("dequant_bf16_(Tensor(a!) out, Tensor q, Tensor scale, Tensor? zero, int group_size) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
  m.impl("dequant_bf16_", &dequant_bf16_);
}
