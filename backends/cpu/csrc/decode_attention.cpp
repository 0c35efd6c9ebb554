// Decode attention over a static KV cache: a few query rows (one decode step, or the k + 1 rows of a speculative
// verify step) against [B, Hkv, L, D] keys and values, with grouped-query heads and a boolean mask.
//
// Why not SDPA: with a mask and grouped heads, transformers' SDPA path repeats K and V per query head inside a
// compiled step (a 3x copy of the whole cache, every layer, every step), and it reads every slot of the static
// cache, valid or not. Here each key and value row is read once per KV head for all its query heads and query
// rows, and slots the mask hides are never read.
//
// Why row-exact: every query row is computed by the same loops in the same order, whatever the number of rows,
// the thread count or the other rows: a verify step's row i is bit-identical to a one-token step at that
// position, so greedy speculative decoding reproduces plain decoding exactly.
//
// Keys are split into fixed chunks of kChunk slots (flash-decoding); each (batch, KV head, chunk) task keeps a
// running max / sum / weighted value per row, and the chunks are combined in chunk order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec_exp.h"

namespace {

constexpr int64_t kChunk = 256;
static_assert(kChunk % 16 == 0, "the AVX-512 path stores whole 16-slot blocks into a kChunk buffer");
constexpr int kLanes = 16;
constexpr int64_t kTaskRows = 6;  // query rows per parallel task (the AVX-512 path's row block)

// sum_d a[d] * b[d] with kLanes independent partial sums, added in a fixed order
inline float dot(const float* a, const float* b, int64_t D) {
  float part[kLanes] = {0.f};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * b[d + l];
  float acc = 0.f;
  for (int l = 0; l < kLanes; ++l) acc += part[l];
  for (; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

using optpass_vec::exp_nonpositive;

// One query row against one chunk of n (<= kChunk) slots, any D: the portable loops (same output layout)
inline void chunk_row_scalar(const float* qr, const float* kb, const float* vb, int64_t ks2, int64_t vs2,
                             const bool* mr, int64_t ms3, int64_t n, int64_t D, float sc, float cap, float* s,
                             float* p, float* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    if (!mr[j * ms3]) {
      s[j] = neg_inf;
      continue;
    }
    float x = dot(qr, kb + j * ks2, D) * sc;
    if (cap > 0.f) x = cap * std::tanh(x / cap);
    s[j] = x;
    m = x > m ? x : m;
  }
  float* acc = out + 2;
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
  if (m == neg_inf) {  // every slot of this chunk hidden from this row
    out[0] = neg_inf;
    out[1] = 0.f;
    return;
  }
  for (int64_t j = 0; j < n; ++j) p[j] = s[j] == neg_inf ? 0.f : exp_nonpositive(s[j] - m);
  float l = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    l += p[j];
    const float* vr = vb + j * vs2;
    const float w = p[j];
    for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
  }
  out[0] = m;
  out[1] = l;
}

#if defined(__AVX512F__)
#define OPTPASS_ATTN_AVX512 1
// lane t of the result = the sum of v[t]'s 16 lanes, for 16 vectors at once (a transpose-and-add tree: ~45
// instructions per 16 sums, where one horizontal reduction per dot product cost a 16-add dependency chain)
inline __m512 sum16(const __m512* v) {
  __m512 s[8], t[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x88), _mm512_shuffle_f32x4(t[2], t[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

using optpass_vec::exp_nonpositive16;

// bit t = mask[t * stride] for t < w (w <= 16): one masked byte load where slots are contiguous (the usual
// case), where one test per slot cost ~3 instructions x 16 slots x every row of every block
inline __mmask16 slot_bits(const bool* m, int64_t stride, int64_t w) {
  const __mmask16 lanes = static_cast<__mmask16>(w >= 16 ? 0xFFFFu : (1u << w) - 1u);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if (stride == 1) {
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, m);  // lanes past w are not read
    return _mm_mask_test_epi8_mask(lanes, bytes, bytes);
  }
#endif
  __mmask16 bits = 0;
  for (int64_t t = 0; t < w; ++t) bits |= static_cast<__mmask16>(m[t * stride] ? 1u << t : 0u);
  return bits;
}

// RB query rows against one chunk of n (<= kChunk) slots, D % 16 == 0: writes each row's running max, sum of
// weights and weighted values [D] to out[r]. Each key and value row is loaded once for all RB rows (a verify
// step's rows and a KV head's query heads share them), but every row still gets exactly the one-row operations:
// scores 16 slots at a time (one vector of partial products per slot, the d blocks in order, then `sum16`), the
// same exp, values accumulated in slot order. Slots hidden from every row are not read; a slot hidden from
// one row only is computed for it and then discarded lane-wise (blend / masked FMA), never mixed into another
// lane, so the result of a row never depends on RB or on the other rows.
template <int RB, int DB>  // DB: D / 16 when known at compile time (queries then stay in registers), else 0
inline void chunk_rows_avx512(const float* const* qr, const float* kb, const float* vb, int64_t ks2, int64_t vs2,
                              const bool* const* mr, int64_t ms3, int64_t n, int64_t D, float sc, float cap,
                              float* const* s, float* const* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  __m512 mx[RB];
  for (int r = 0; r < RB; ++r) mx[r] = ninf;
  __m512 part[RB][16];  // per row, per slot of the block: the partial products of one score
  __m512 qv[RB][DB > 0 ? DB : 1];
  if constexpr (DB > 0)
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < DB; ++i) qv[r][i] = _mm512_loadu_ps(qr[r] + 16 * i);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    __mmask16 valid[RB], any = 0;
    for (int r = 0; r < RB; ++r) {
      valid[r] = slot_bits(mr[r] + j0 * ms3, ms3, w);
      any |= valid[r];
    }
    for (int t = 0; t < 16; ++t) {
      __m512 acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
      if (any >> t & 1) {
        const float* kr = kb + (j0 + t) * ks2;
        if constexpr (DB > 0) {
          for (int i = 0; i < DB; ++i) {
            const __m512 kd = _mm512_loadu_ps(kr + 16 * i);
            for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(qv[r][i], kd, acc[r]);
          }
        } else {
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 kd = _mm512_loadu_ps(kr + d);
            for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qr[r] + d), kd, acc[r]);
          }
        }
      }
      for (int r = 0; r < RB; ++r) part[r][t] = acc[r];
    }
    for (int r = 0; r < RB; ++r) {
      if (!valid[r]) {
        _mm512_storeu_ps(s[r] + j0, ninf);
        continue;
      }
      __m512 x = _mm512_mul_ps(sum16(part[r]), _mm512_set1_ps(sc));
      if (cap > 0.f) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, x);
        for (int t = 0; t < 16; ++t) tmp[t] = cap * std::tanh(tmp[t] / cap);
        x = _mm512_load_ps(tmp);
      }
      x = _mm512_mask_blend_ps(valid[r], ninf, x);
      _mm512_storeu_ps(s[r] + j0, x);
      mx[r] = _mm512_max_ps(mx[r], x);
    }
  }
  bool live[RB];
  bool any_live = false;
  for (int r = 0; r < RB; ++r) {
    const float m = _mm512_reduce_max_ps(mx[r]);
    live[r] = m != neg_inf;
    any_live |= live[r];
    out[r][0] = m;
    if (!live[r]) {  // every slot of this chunk hidden from this row
      out[r][1] = 0.f;
      for (int64_t d = 0; d < D; ++d) out[r][2 + d] = 0.f;
      continue;
    }
    __m512 lsum = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {  // lanes past n were stored as -inf above: not live
      const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(s[r] + j0), ninf, _CMP_NEQ_OQ);
      const __m512 p = _mm512_maskz_mov_ps(keep, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s[r] + j0), mv)));
      _mm512_storeu_ps(s[r] + j0, p);
      lsum = _mm512_add_ps(lsum, p);
    }
    out[r][1] = _mm512_reduce_add_ps(lsum);
  }
  if (!any_live) return;
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t blocks = std::min<int64_t>(4, (D - d0) / 16);
    __m512 a[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __mmask16 use[RB];  // all lanes or none: a row whose weight is 0 (hidden or underflowed) skips this slot
      bool used = false;
      for (int r = 0; r < RB; ++r) {
        use[r] = live[r] && s[r][j] != 0.f ? 0xFFFF : 0;
        used |= use[r] != 0;
      }
      if (!used) continue;  // never read
      const float* vr = vb + j * vs2 + d0;
      for (int64_t i = 0; i < blocks; ++i) {
        const __m512 vi = _mm512_loadu_ps(vr + 16 * i);
        for (int r = 0; r < RB; ++r) a[r][i] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(s[r][j]), vi, a[r][i], use[r]);
      }
    }
    for (int r = 0; r < RB; ++r)
      if (live[r])
        for (int64_t i = 0; i < blocks; ++i) _mm512_storeu_ps(out[r] + 2 + d0 + 16 * i, a[r][i]);
  }
}

constexpr int kRowBlock = kTaskRows;  // rows per pass over a chunk: 6 x 4 value accumulators + 4 value vectors in registers

// rows [0, R) of one chunk in blocks of up to kRowBlock
inline void chunk_all_rows_avx512(int64_t R, const float* const* qr, const float* kb, const float* vb, int64_t ks2,
                                  int64_t vs2, const bool* const* mr, int64_t ms3, int64_t n, int64_t D, float sc,
                                  float cap, float* const* s, float* const* out) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
    const int64_t rb = std::min<int64_t>(kRowBlock, R - r0);
    const auto call = [&](auto tag) {
      constexpr int kRows = decltype(tag)::value;
      if (D == 64) {  // SmolLM2 / Llama head size: the queries' 4 vectors per row stay in registers
        chunk_rows_avx512<kRows, 4>(qr + r0, kb, vb, ks2, vs2, mr + r0, ms3, n, D, sc, cap, s + r0, out + r0);
      } else {
        chunk_rows_avx512<kRows, 0>(qr + r0, kb, vb, ks2, vs2, mr + r0, ms3, n, D, sc, cap, s + r0, out + r0);
      }
    };
    switch (rb) {
      case 1: call(std::integral_constant<int, 1>{}); break;
      case 2: call(std::integral_constant<int, 2>{}); break;
      case 3: call(std::integral_constant<int, 3>{}); break;
      case 4: call(std::integral_constant<int, 4>{}); break;
      case 5: call(std::integral_constant<int, 5>{}); break;
      default: call(std::integral_constant<int, 6>{}); break;
    }
  }
}
#endif
}  // namespace

// q [B, Hq, Q, D], k / v [B, Hkv, L, D] (last dim contiguous), mask bool [B, 1 or Hq, Q, L] (broadcast strides
// allowed; true = attend). Returns [B, Q, Hq, D], the layout transformers' attention functions return.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "decode_attention: 4-d inputs");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 q, k, v");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention: a boolean mask");
  const auto qc = q.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == L && k.size(3) == D &&
                  v.size(3) == D && Hq % Hkv == 0,
              "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k / v need a contiguous last dim");
  TORCH_CHECK(mask.size(0) == B && (mask.size(1) == 1 || mask.size(1) == Hq) && mask.size(2) == Q &&
                  mask.size(3) == L,
              "decode_attention: mask must be [B, 1 or Hq, Q, L]");
  const int64_t G = Hq / Hkv, R = G * Q;  // query rows per KV head
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  // per (b, kv head, chunk, row): running max, sum of weights, weighted values [D]
  auto partial = torch::empty({B, Hkv, chunks, R, D + 2}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* pp = partial.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ms0 = mask.stride(0), ms1 = mask.size(1) == 1 ? 0 : mask.stride(1), ms2 = mask.stride(2),
                ms3 = mask.stride(3);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Only (batch, chunk) pairs with a slot some row may see become tasks: a 2k-slot static cache holding 1.2k
  // tokens has 3 of its 8 chunks empty, and splitting all chunks evenly gave one of two threads ~60% of the work.
  // Empty chunks keep (-inf, 0), which the combine below skips, as their computed result would be.
  // Each task is also one block of kTaskRows query rows (a verify step's 18 rows per KV head make 3), so two
  // threads get 45 tasks of similar size instead of 15 that split 8 : 7.
  const int64_t Hm = mask.size(1), row_blocks = (R + kTaskRows - 1) / kTaskRows;
  std::vector<int64_t> tasks;
  tasks.reserve(B * Hkv * chunks * row_blocks);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kChunk, n = std::min(kChunk, L - j0);
      bool seen = false;
      for (int64_t hm = 0; hm < Hm && !seen; ++hm)
        for (int64_t i = 0; i < Q && !seen; ++i) {
          const bool* m = mp + b * ms0 + hm * mask.stride(1) + i * ms2 + j0 * ms3;
          for (int64_t j = 0; j < n && !seen; ++j) seen = m[j * ms3];
        }
      for (int64_t h = 0; h < Hkv; ++h) {
        if (seen) {
          for (int64_t rb = 0; rb < row_blocks; ++rb) tasks.push_back(((b * Hkv + h) * chunks + c) * row_blocks + rb);
          continue;
        }
        for (int64_t r = 0; r < R; ++r) {
          float* o = pp + (((b * Hkv + h) * chunks + c) * R + r) * (D + 2);
          o[0] = neg_inf;
          o[1] = 0.f;
        }
      }
    }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(R * kChunk), p(kChunk);
    std::vector<const float*> qr(R);
    std::vector<const bool*> mr(R);
    std::vector<float*> out(R), srow(R);
    for (int64_t r = 0; r < R; ++r) srow[r] = s.data() + r * kChunk;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = tasks[t] / row_blocks, r0 = tasks[t] % row_blocks * kTaskRows;
      const int64_t rows = std::min(kTaskRows, R - r0);
      const int64_t c = task % chunks, h = (task / chunks) % Hkv, b = task / (chunks * Hkv);
      const int64_t j0 = c * kChunk, n = std::min(kChunk, L - j0);
      const float* kb = kp + b * ks0 + h * ks1 + j0 * ks2;
      const float* vb = vp + b * vs0 + h * vs1 + j0 * vs2;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / Q, i = r % Q, hq = h * G + g;
        qr[r] = qp + ((b * Hq + hq) * Q + i) * D;
        mr[r] = mp + b * ms0 + hq * ms1 + i * ms2 + j0 * ms3;
        out[r] = pp + (((b * Hkv + h) * chunks + c) * R + r) * (D + 2);
      }
#ifdef OPTPASS_ATTN_AVX512
      if (D % 16 == 0) {
        chunk_all_rows_avx512(rows, qr.data() + r0, kb, vb, ks2, vs2, mr.data() + r0, ms3, n, D, sc, cap,
                              srow.data() + r0, out.data() + r0);
        continue;
      }
#endif
      for (int64_t r = r0; r < r0 + rows; ++r)
        chunk_row_scalar(qr[r], kb, vb, ks2, vs2, mr[r], ms3, n, D, sc, cap, srow[r], p.data(), out[r]);
    }
  });

  auto result = torch::empty({B, Q, Hq, D}, q.options());
  float* op = result.data_ptr<float>();
  at::parallel_for(0, B * Hkv * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t % R, h = (t / R) % Hkv, b = t / (R * Hkv);
      const int64_t g = r / Q, i = r % Q, hq = h * G + g;
      float m = neg_inf;
      for (int64_t c = 0; c < chunks; ++c) {
        const float mc = pp[(((b * Hkv + h) * chunks + c) * R + r) * (D + 2)];
        m = mc > m ? mc : m;
      }
      float* o = op + ((b * Q + i) * Hq + hq) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      if (m == neg_inf) continue;  // a row that may attend nowhere (a padding row): zeros, as SDPA's callers mask
      float l = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = pp + (((b * Hkv + h) * chunks + c) * R + r) * (D + 2);
        if (part[1] == 0.f) continue;
        const float w = exp_nonpositive(part[0] - m);
        l += w * part[1];
        for (int64_t d = 0; d < D; ++d) o[d] += w * part[2 + d];
      }
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return result;
}

TORCH_LIBRARY_FRAGMENT(optpass, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) { m.impl("decode_attention", &decode_attention); }
