// Memory-bound quantized GEMV / skinny GEMM for CPU decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T, int8 W with
// one scale per output channel or per group of inputs (a GGUF Q8_0 / Q5_0 / Q4_K weight re-packs exactly at g32).
// Weights stream from DRAM once per call; each thread takes a contiguous slice of output rows so the
// hardware prefetcher sees one linear stream. fp32 activations and accumulation (no activation rounding).
// With AVX-512 the inner dots keep four independent accumulators: one accumulator would make the loop
// FMA-latency bound (~4 B/cycle, ~12 GB/s); four keep it memory bound. Other CPUs get the plain loops.
// On AVX-512 VNNI CPUs, per-channel weights also come in a packed layout (output channels in vector lanes,
// `gemv_int8_packed` below), which is what decode and verify steps use: same integer sums, fewer instructions
// per row.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
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

// sum_k x[k] * w[k] * s[k / group] for int8 w with a scale per `group` inputs (group % 16 == 0 on AVX-512)
inline float dot_int8_grouped(const float* x, const int8_t* w, const float* s, int64_t K, int64_t group) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  if (group % 16 == 0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    auto term = [&](int64_t off) {
      __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + off))));
      return _mm512_mul_ps(wf, _mm512_set1_ps(s[off / group]));
    };
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), term(k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), term(k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), term(k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), term(k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), term(k), a0);
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
#endif
  for (; k < K; ++k) acc += x[k] * static_cast<float>(w[k]) * s[k / group];
  return acc;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define OPTPASS_VNNI 1
// The float loops above are bound by int8 -> fp32 conversions (~20 GB/s on 2 Zen 4 cores), not by memory.
// With VNNI the activations are quantized once per call to int16 (per-row scale: error <= 2^-16 of the row's
// largest |x|, finer than bf16 for every element above 1/128 of it) and `vpdpwssd` takes 32 int8 x int16
// products per instruction into int32: two ops per 32 weights instead of eight.
constexpr int64_t kFlush = 2048;  // int32 partial sums are moved to float every kFlush inputs (no overflow)

inline __m512i widen(const int8_t* w) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// the 16 int32 lanes of a summed in int64: each lane holds at most kFlush / 16 products (< 2^31), their total
// need not fit in 32 bits
inline int64_t sum_lanes_exact(__m512i a) {
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
  return _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(half));
}

// y[m] = sum_k x[m, k] * w[k] for M int16 activation rows and one int8 weight row (per-channel scale applied
// by the caller), summed exactly in integers and rounded to float once. Each weight chunk is widened once and
// used by every row; two accumulator sets per row keep vpdpwssd's latency hidden.
template <int M>
inline void dot_rows(const int16_t* x, const int8_t* w, int64_t K, float* out) {
  int64_t total[M] = {};
  int64_t k = 0;
  while (k < K) {
    const int64_t end = std::min(K, k + kFlush);
    __m512i a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_si512();
    for (; k + 64 <= end; k += 64) {
      const __m512i w0 = widen(w + k), w1 = widen(w + k + 32);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_dpwssd_epi32(a[m], _mm512_loadu_si512(x + m * K + k), w0);
        b[m] = _mm512_dpwssd_epi32(b[m], _mm512_loadu_si512(x + m * K + k + 32), w1);
      }
    }
    for (; k + 32 <= end; k += 32) {
      const __m512i w0 = widen(w + k);
      for (int m = 0; m < M; ++m) a[m] = _mm512_dpwssd_epi32(a[m], _mm512_loadu_si512(x + m * K + k), w0);
    }
    for (int m = 0; m < M; ++m) {
      total[m] += sum_lanes_exact(a[m]) + sum_lanes_exact(b[m]);
      for (int64_t j = k; j < end; ++j) total[m] += static_cast<int32_t>(x[m * K + j]) * w[j];
    }
    k = end;
  }
  for (int m = 0; m < M; ++m) out[m] = static_cast<float>(total[m]);
}

// y[m] = sum_g s[g] * sum_{k in g} x[m, k] * w[k], a scale per `group` (% 32 == 0) inputs; two groups at a
// time into separate float accumulators
template <int M>
inline void dot_rows_grouped(const int16_t* x, const int8_t* w, const float* s, int64_t K, int64_t group, float* out) {
  __m512 f0[M], f1[M];
  for (int m = 0; m < M; ++m) f0[m] = f1[m] = _mm512_setzero_ps();
  const int64_t groups = K / group;
  for (int64_t g = 0; g < groups; g += 2) {
    const bool pair = g + 1 < groups;
    __m512i a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_si512();
    for (int64_t j = 0; j < group; j += 32) {
      const int64_t ka = g * group + j, kb = ka + group;
      const __m512i wa = widen(w + ka);
      const __m512i wb = pair ? widen(w + kb) : _mm512_setzero_si512();
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_dpwssd_epi32(a[m], _mm512_loadu_si512(x + m * K + ka), wa);
        if (pair) b[m] = _mm512_dpwssd_epi32(b[m], _mm512_loadu_si512(x + m * K + kb), wb);
      }
    }
    const __m512 sa = _mm512_set1_ps(s[g]), sb = _mm512_set1_ps(pair ? s[g + 1] : 0.f);
    for (int m = 0; m < M; ++m) {
      f0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m]), sa, f0[m]);
      if (pair) f1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b[m]), sb, f1[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(f0[m], f1[m]));
}

template <int M>
void rows_vnni(const int16_t* xq, const float* xs, const int8_t* q, const float* scale, float* y, int64_t N,
               int64_t K, int64_t group) {
  const int64_t groups = group ? K / group : 1;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float out[M];
    if (group) {
      dot_rows_grouped<M>(xq, q + n * K, scale + n * groups, K, group, out);
      for (int m = 0; m < M; ++m) y[m * N + n] = out[m] * xs[m];
    } else {
      dot_rows<M>(xq, q + n * K, K, out);
      for (int m = 0; m < M; ++m) y[m * N + n] = out[m] * scale[n] * xs[m];
    }
  }
}

// The packed layout (`gemv_ops.pack_rows`): output channels in vector lanes. Blocks of kPackedOut outputs; within
// a block, for each pair of inputs (k, k + 1), 64 bytes: w[n0, k], w[n0, k + 1], w[n0 + 1, k], ... So one
// vpdpwssd multiplies a broadcast pair of activations by 16 outputs' weight pairs, the weights stream as one
// linear run (no per-output streams, no horizontal sums), and each activation pair is loaded once per block for
// every row. A lane's int32 sum is moved to int64 every kFlushPairs pairs, so no sum can overflow; integer sums
// are exact, so each row's result is bit-identical to the row layout above and independent of M.
constexpr int64_t kPackedOut = 32;
constexpr int64_t kFlushPairs = 128;  // 256 products of |x| <= 2^15, |w| <= 2^7 per lane: < 2^31

inline void add_to_int64(__m512i a, __m512i& lo, __m512i& hi) {
  lo = _mm512_add_epi64(lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)));
  hi = _mm512_add_epi64(hi, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1)));
}

// a[m] = int32 lanes of sum over input pairs [p0, p1) of one packed block for each of M rows: outputs 0-15 in
// a[m][0], 16-31 in a[m][1]
template <int M>
inline void pair_sums(const int16_t* xq, int64_t K, const int8_t* w, int64_t p0, int64_t p1, __m512i (*a)[2]) {
  for (int m = 0; m < M; ++m) a[m][0] = a[m][1] = _mm512_setzero_si512();
  for (int64_t p = p0; p < p1; ++p) {
    const __m512i w0 = widen(w + p * 64), w1 = widen(w + p * 64 + 32);
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      std::memcpy(&pair, xq + m * K + 2 * p, sizeof(pair));
      const __m512i xv = _mm512_set1_epi32(pair);
      a[m][0] = _mm512_dpwssd_epi32(a[m][0], xv, w0);
      a[m][1] = _mm512_dpwssd_epi32(a[m][1], xv, w1);
    }
  }
}

template <int M>
void packed_vnni(const int16_t* xq, const float* xs, const int8_t* packed, const float* scale, float* y, int64_t N,
                 int64_t K) {
  const int64_t blocks = (N + kPackedOut - 1) / kPackedOut, pairs = K / 2;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* w = packed + b * kPackedOut * K;
    __m512i sum[M][4];  // int64 lanes: outputs 0-7, 8-15, 16-23, 24-31 of the block
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) sum[m][i] = _mm512_setzero_si512();
    for (int64_t p0 = 0; p0 < pairs; p0 += kFlushPairs) {
      const int64_t p1 = std::min(pairs, p0 + kFlushPairs);
      __m512i a[M][2];
      pair_sums<M>(xq, K, w, p0, p1, a);
      for (int m = 0; m < M; ++m) {
        add_to_int64(a[m][0], sum[m][0], sum[m][1]);
        add_to_int64(a[m][1], sum[m][2], sum[m][3]);
      }
    }
    const int64_t n0 = b * kPackedOut, live = std::min(kPackedOut, N - n0);
    for (int m = 0; m < M; ++m) {
      alignas(64) int64_t t[kPackedOut];
      for (int i = 0; i < 4; ++i) _mm512_store_si512(t + 8 * i, sum[m][i]);
      for (int64_t l = 0; l < live; ++l) y[m * N + n0 + l] = static_cast<float>(t[l]) * scale[n0 + l] * xs[m];
    }
  }
}

// x [M, K] fp32 -> int16 [M, K] with one scale per row (returned in xs)
void quantize_rows_i16(const float* x, int16_t* xq, float* xs, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::nearbyint(x[m * K + k] * inv));
    xs[m] = scale;
  }
}

template <template <int> class Kernel, typename... Args>
void dispatch_rows(int64_t M, Args... args) {
  switch (M) {
    case 1: Kernel<1>::run(args...); break;
    case 2: Kernel<2>::run(args...); break;
    case 3: Kernel<3>::run(args...); break;
    case 4: Kernel<4>::run(args...); break;
    case 5: Kernel<5>::run(args...); break;
    case 6: Kernel<6>::run(args...); break;
    case 7: Kernel<7>::run(args...); break;
    default: Kernel<8>::run(args...); break;
  }
}
// The packed layout with a scale per `group` inputs (% 2 == 0, <= 2 * kFlushPairs): scales packed alike,
// [blocks, K / group, kPackedOut] (`gemv_ops.pack_group_scales`). Each group's exact integer sum per output is
// scaled into float lanes, groups in order: the same operations for a row whatever M is.
template <int M>
void packed_grouped_vnni(const int16_t* xq, const float* xs, const int8_t* packed, const float* scale, float* y,
                         int64_t N, int64_t K, int64_t group) {
  const int64_t blocks = (N + kPackedOut - 1) / kPackedOut, groups = K / group, half = group / 2;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* w = packed + b * kPackedOut * K;
    const float* sb = scale + b * groups * kPackedOut;
    __m512 f[M][2];
    for (int m = 0; m < M; ++m) f[m][0] = f[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i a[M][2];
      pair_sums<M>(xq, K, w, g * half, (g + 1) * half, a);
      const __m512 s0 = _mm512_loadu_ps(sb + g * kPackedOut), s1 = _mm512_loadu_ps(sb + g * kPackedOut + 16);
      for (int m = 0; m < M; ++m) {
        f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), s0, f[m][0]);
        f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), s1, f[m][1]);
      }
    }
    const int64_t n0 = b * kPackedOut, live = std::min(kPackedOut, N - n0);
    for (int m = 0; m < M; ++m) {
      alignas(64) float t[kPackedOut];
      _mm512_store_ps(t, f[m][0]);
      _mm512_store_ps(t + 16, f[m][1]);
      for (int64_t l = 0; l < live; ++l) y[m * N + n0 + l] = t[l] * xs[m];
    }
  }
}

// int4 packed (`gemv_ops.pack_int4_rows`): blocks of kPackedOut outputs; per quad of inputs (4j .. 4j + 3) 64 bytes,
// byte 4 * o + i holding w[n0 + o, 4j + i] in its low nibble and w[n0 + 16 + o, 4j + i] in its high nibble. One
// 64-byte load, a shift and two masks give two registers of 16 outputs x 4 inputs, and `vpdpbusd` multiplies
// each by a broadcast quad of activation bytes: 128 weights per load. The int16 activations are split into a
// signed high byte and an unsigned low byte, x = 256 * hi + lo, so sum q x = 256 * sum q hi + sum q lo exactly
// (q in 0..15 serves as either operand of u8 x s8): the same integer sums as an int16 product, with fewer
// instructions per weight than widening nibbles to int16 (the first version; no faster in the decode loop).
// Streaming from DRAM at one row it runs below the int8 kernel's bytes per second (`benchmarks/verify_kernels.py`):
// the per-group scale work keeps it partly compute bound.
// W[n, k] = (q - zero) * scale per group, written (q - 8) * scale + (8 - zero) * scale: y = xs * sum_g (scale *
// sum (q - 8) x + centre_offset * sum x), scale and centre_offset read as fp16 (packed like the int8 group
// scales; `pack_int4_rows` refuses scales fp16 cannot hold). Centring keeps the offset small (zero is near 8 for
// most groups), so its fp16 rounding does not cancel against the q term. Rows go through a block kQuadRows at a
// time (more would spill accumulators; the block's weights are then re-read from cache). A row's operations do
// not depend on M, so verify rows equal decode rows.
constexpr int kQuadRows = 3;

inline __m512 load_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

struct Int4Rows {  // M activation rows, split for vpdpbusd
  const int8_t* hi;
  const uint8_t* lo;
  const float* scale;
  const int32_t* group_sum;  // [M, groups]: sum of the int16 activations per group (the zero-point term)
};

template <int M>
void quad_block(Int4Rows x, const uint8_t* w, const uint16_t* sb, const uint16_t* cb, float* y, int64_t N, int64_t K,
                int64_t group, int64_t n0) {
  const int64_t groups = K / group, quads = group / 4;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 f[M][2];
  for (int m = 0; m < M; ++m) f[m][0] = f[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i h[M][2], l[M][2];  // sums of q * hi and q * lo, outputs 0-15 and 16-31
    for (int m = 0; m < M; ++m) h[m][0] = h[m][1] = l[m][0] = l[m][1] = _mm512_setzero_si512();
    for (int64_t j = g * quads; j < (g + 1) * quads; ++j) {
      const __m512i raw = _mm512_loadu_si512(w + j * 64);
      const __m512i w0 = _mm512_and_si512(raw, mask), w1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
      for (int m = 0; m < M; ++m) {
        int32_t hq, lq;
        std::memcpy(&hq, x.hi + m * K + 4 * j, sizeof(hq));
        std::memcpy(&lq, x.lo + m * K + 4 * j, sizeof(lq));
        const __m512i hv = _mm512_set1_epi32(hq), lv = _mm512_set1_epi32(lq);
        h[m][0] = _mm512_dpbusd_epi32(h[m][0], w0, hv);
        h[m][1] = _mm512_dpbusd_epi32(h[m][1], w1, hv);
        l[m][0] = _mm512_dpbusd_epi32(l[m][0], lv, w0);
        l[m][1] = _mm512_dpbusd_epi32(l[m][1], lv, w1);
      }
    }
    const __m512 s0 = load_half(sb + g * kPackedOut), s1 = load_half(sb + g * kPackedOut + 16);
    const __m512 c0 = load_half(cb + g * kPackedOut), c1 = load_half(cb + g * kPackedOut + 16);
    for (int m = 0; m < M; ++m) {
      const int32_t sum = x.group_sum[m * groups + g];
      const __m512i centre = _mm512_set1_epi32(8 * sum);  // sum (q - 8) x, exactly
      const __m512 sx = _mm512_set1_ps(static_cast<float>(sum));
      const __m512i a0 = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(h[m][0], 8), l[m][0]), centre);
      const __m512i a1 = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(h[m][1], 8), l[m][1]), centre);
      f[m][0] = _mm512_fmadd_ps(sx, c0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), s0, f[m][0]));
      f[m][1] = _mm512_fmadd_ps(sx, c1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), s1, f[m][1]));
    }
  }
  const int64_t live = std::min(kPackedOut, N - n0);
  for (int m = 0; m < M; ++m) {
    alignas(64) float t[kPackedOut];
    _mm512_store_ps(t, f[m][0]);
    _mm512_store_ps(t + 16, f[m][1]);
    for (int64_t l = 0; l < live; ++l) y[m * N + n0 + l] = t[l] * x.scale[m];
  }
}

template <int M>
void quad_rows(Int4Rows x, const uint8_t* w, const uint16_t* sb, const uint16_t* cb, float* y, int64_t N, int64_t K,
               int64_t group, int64_t n0) {
  constexpr int A = M < kQuadRows ? M : kQuadRows;
  quad_block<A>(x, w, sb, cb, y, N, K, group, n0);
  if constexpr (M > A) {
    const int64_t groups = K / group;
    const Int4Rows rest{x.hi + A * K, x.lo + A * K, x.scale + A, x.group_sum + A * groups};
    quad_rows<M - A>(rest, w, sb, cb, y + A * N, N, K, group, n0);
  }
}

template <int M>
struct PackedInt4Vnni {
  static void run(Int4Rows x, const uint8_t* packed, const uint16_t* scale, const uint16_t* centre_offset, float* y,
                  int64_t N, int64_t K, int64_t group) {
    const int64_t blocks = (N + kPackedOut - 1) / kPackedOut, groups = K / group;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
      quad_rows<M>(x, packed + b * (kPackedOut / 2) * K, scale + b * groups * kPackedOut,
                   centre_offset + b * groups * kPackedOut, y, N, K, group, b * kPackedOut);
  }
};

void int4_packed_vnni(const float* x, const uint8_t* packed, const uint16_t* scale, const uint16_t* centre_offset,
                      float* y, int64_t M, int64_t N, int64_t K, int64_t group) {
  std::vector<int16_t> xq(M * K);
  float xs[kMaxRows];
  quantize_rows_i16(x, xq.data(), xs, M, K);
  const int64_t groups = K / group;
  std::vector<int8_t> hi(M * K);
  std::vector<uint8_t> lo(M * K);
  std::vector<int32_t> group_sum(M * groups, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int16_t v = xq[m * K + k];
      hi[m * K + k] = static_cast<int8_t>(v >> 8);  // arithmetic shift: v = 256 * hi + lo, lo in 0..255
      lo[m * K + k] = static_cast<uint8_t>(v & 0xFF);
      group_sum[m * groups + k / group] += v;
    }
  dispatch_rows<PackedInt4Vnni>(M, Int4Rows{hi.data(), lo.data(), xs, group_sum.data()}, packed, scale, centre_offset,
                                y, N, K, group);
}

template <int M>
struct RowsVnni {
  static void run(const int16_t* xq, const float* xs, const int8_t* q, const float* s, float* y, int64_t N, int64_t K,
                  int64_t group) {
    rows_vnni<M>(xq, xs, q, s, y, N, K, group);
  }
};
template <int M>
struct PackedVnni {
  static void run(const int16_t* xq, const float* xs, const int8_t* q, const float* s, float* y, int64_t N, int64_t K,
                  int64_t group) {
    if (group) {
      packed_grouped_vnni<M>(xq, xs, q, s, y, N, K, group);
    } else {
      packed_vnni<M>(xq, xs, q, s, y, N, K);
    }
  }
};

void int8_rows_vnni(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t group) {
  std::vector<int16_t> xq(M * K);
  float xs[kMaxRows];
  quantize_rows_i16(x, xq.data(), xs, M, K);
  dispatch_rows<RowsVnni>(M, xq.data(), static_cast<const float*>(xs), q, scale, y, N, K, group);
}

void int8_packed_vnni(const float* x, const int8_t* packed, const float* scale, float* y, int64_t M, int64_t N,
                      int64_t K, int64_t group) {
  std::vector<int16_t> xq(M * K);
  float xs[kMaxRows];
  quantize_rows_i16(x, xq.data(), xs, M, K);
  dispatch_rows<PackedVnni>(M, xq.data(), static_cast<const float*>(xs), packed, scale, y, N, K, group);
}
#endif

// int8, symmetric per output channel: W[n, k] = q[n, k] * scale[n]
void int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w = q + n * K;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_int8(x + m * K, w, K) * scale[n];
  }
}

// int8, symmetric per group of inputs: W[n, k] = q[n, k] * scale[n, k / group]
void int8_grouped_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                       int64_t group) {
  const int64_t groups = K / group;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w = q + n * K;
    const float* s = scale + n * groups;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_int8_grouped(x + m * K, w, s, K, group);
  }
}

// fp32 -> bf16 bits, round to nearest even (integer ops only, so the loops below vectorize)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// out[n, k] = q[n, k] * scale[n, k / group]  (int8, symmetric; group == K: one scale per output channel)
void dequant_int8_rows(const int8_t* q, const float* scale, uint16_t* out, int64_t N, int64_t K, int64_t group) {
  const int64_t groups = K / group;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g];
      for (int64_t k = g * group; k < (g + 1) * group; ++k) out[n * K + k] = to_bf16(static_cast<float>(q[n * K + k]) * s);
    }
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
    TORCH_CHECK(q.size(0) == N && q.size(1) == K && sc.numel() % N == 0 && K % (sc.numel() / N) == 0,
                "dequant_bf16_: int8 shapes disagree");
    dequant_int8_rows(qc.data_ptr<int8_t>(), sc.data_ptr<float>(), dst, N, K, K / (sc.numel() / N));
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
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous().to(torch::kFloat);
  const int64_t N = q.size(0), K = x.size(1);
  TORCH_CHECK(sc.numel() % N == 0 && K % (sc.numel() / N) == 0, "gemv_int8: scale must be [N] or [N, K / group]");
  auto y = torch::empty({x.size(0), N}, x.options());
  const int64_t groups = sc.numel() / N;
#ifdef OPTPASS_VNNI
  if (groups == 1 || (K / groups) % 32 == 0) {
    int8_rows_vnni(xc.data_ptr<float>(), qc.data_ptr<int8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(), x.size(0),
                   N, K, groups == 1 ? 0 : K / groups);
    return y;
  }
#endif
  if (groups == 1) {
    int8_rows(xc.data_ptr<float>(), qc.data_ptr<int8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(), x.size(0), N, K);
  } else {
    int8_grouped_rows(xc.data_ptr<float>(), qc.data_ptr<int8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(),
                      x.size(0), N, K, K / groups);
  }
  return y;
}

#ifdef OPTPASS_VNNI
// x [M, K] fp32, packed int8 [ceil(N / 32), K / 2, 32, 2] (`gemv_ops.pack_rows`), and either scale [N] (per
// channel) or packed group scales [ceil(N / 32), K / group, 32] (`gemv_ops.pack_group_scales`)
torch::Tensor gemv_int8_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "gemv_int8_packed: x must be 2-D float32");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv_int8_packed: at most ", kMaxRows, " rows");
  const int64_t N = n, K = x.size(1), blocks = (n + kPackedOut - 1) / kPackedOut;
  TORCH_CHECK(packed.scalar_type() == torch::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == blocks && packed.size(1) * 2 == K && packed.size(2) == kPackedOut &&
                  packed.size(3) == 2,
              "gemv_int8_packed: packed must be int8 [ceil(N / 32), K / 2, 32, 2]");
  int64_t group = 0;
  if (scale.dim() == 3) {
    TORCH_CHECK(scale.size(0) == blocks && scale.size(2) == kPackedOut && scale.size(1) > 0 && K % scale.size(1) == 0,
                "gemv_int8_packed: group scales must be [ceil(N / 32), K / group, 32]");
    group = K / scale.size(1);
    TORCH_CHECK(group % 2 == 0 && group <= 2 * kFlushPairs, "gemv_int8_packed: group size ", group,
                " must be even and at most ", 2 * kFlushPairs);
  } else {
    TORCH_CHECK(scale.numel() == N, "gemv_int8_packed: per-channel scale must have N entries");
  }
  auto xc = x.contiguous(), sc = scale.contiguous().to(torch::kFloat);
  auto y = torch::empty({x.size(0), N}, x.options());
  int8_packed_vnni(xc.data_ptr<float>(), packed.data_ptr<int8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(),
                   x.size(0), N, K, group);
  return y;
}
#endif

#ifdef OPTPASS_VNNI
// x [M, K] fp32, packed int4 [ceil(N / 32), K / 4, 64] uint8 (`gemv_ops.pack_int4_rows`), fp16 scale and
// centre offset [ceil(N / 32), K / group, 32] (`gemv_ops.pack_group_scales`, as fp16)
torch::Tensor gemv_int4_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor centre_offset,
                               int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "gemv_int4_packed: x must be 2-D float32");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv_int4_packed: at most ", kMaxRows, " rows");
  const int64_t N = n, K = x.size(1), blocks = (n + kPackedOut - 1) / kPackedOut;
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == blocks && packed.size(1) * 4 == K && packed.size(2) == 2 * kPackedOut,
              "gemv_int4_packed: packed must be uint8 [ceil(N / 32), K / 4, 64]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && centre_offset.scalar_type() == torch::kHalf &&
                  scale.is_contiguous() && centre_offset.is_contiguous() && scale.dim() == 3 &&
                  scale.sizes() == centre_offset.sizes() && scale.size(0) == blocks && scale.size(2) == kPackedOut &&
                  scale.size(1) > 0 && K % scale.size(1) == 0,
              "gemv_int4_packed: scale and centre_offset must be fp16 [ceil(N / 32), K / group, 32]");
  const int64_t group = K / scale.size(1);
  TORCH_CHECK(group % 4 == 0 && group <= 2 * kFlushPairs, "gemv_int4_packed: group size ", group,
              " must be a multiple of 4 and at most ", 2 * kFlushPairs);
  auto xc = x.contiguous();
  auto y = torch::empty({x.size(0), N}, x.options());
  int4_packed_vnni(xc.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                   reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                   reinterpret_cast<const uint16_t*>(centre_offset.data_ptr<at::Half>()), y.data_ptr<float>(),
                   x.size(0), N, K, group);
  return y;
}
#endif

// Registered with the dispatcher (no Python on the call path); fake impls are added from Python.
TORCH_LIBRARY_FRAGMENT(optpass, m) {
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("dequant_bf16_(Tensor(a!) out, Tensor q, Tensor scale, Tensor? zero, int group_size) -> Tensor(a!)");
#ifdef OPTPASS_VNNI  // defined only where its kernel exists: Python asks `hasattr(torch.ops.optpass, ...)`
  m.def("gemv_int8_packed(Tensor x, Tensor packed, Tensor scale, int n) -> Tensor");
  m.def("gemv_int4_packed(Tensor x, Tensor packed, Tensor scale, Tensor centre_offset, int n) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
  m.impl("dequant_bf16_", &dequant_bf16_);
#ifdef OPTPASS_VNNI
  m.impl("gemv_int8_packed", &gemv_int8_packed);
  m.impl("gemv_int4_packed", &gemv_int4_packed);
#endif
}
