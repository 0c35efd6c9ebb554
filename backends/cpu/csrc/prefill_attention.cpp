// Prefill attention on AVX-512 BF16 CPUs: queries 0..S-1 over keys 0..S-1 (a prefill from an empty cache),
// causal or not, grouped-query heads, left padding, and optionally a block layout (the sparse_attention pass):
// each query block visits only its listed key blocks, so the work is proportional to the kept blocks.
//
// Why: PyTorch's CPU flash kernel runs a SmolLM2 prefill's attention at ~55 GFLOP/s on the 2-core Zen 4 VM
// (27% of a 512-token int8 prefill), and FlexAttention compiled by Inductor at about half that. Here both
// products run on `vdpbf16ps` (bf16 inputs, fp32 sums: 32 multiply-adds per instruction) and the softmax is fp32
// and online (flash attention), with the operands packed once per call so that every instruction reads a whole
// vector:
//   keys    [S/16][D/2][16 keys][2 dims]   -> one vector = 16 keys x one pair of dims (scores in key lanes)
//   values  [S/2][D][2 keys]               -> one vector = 16 dims x one pair of keys (outputs in dim lanes)
//   queries [rows][D] bf16, pre-scaled     -> one pair of dims broadcast per instruction
// Numerics are bf16 SDPA's: q * scale, k, v and the softmax weights are rounded to bf16, every sum is fp32.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>

#include "vec_exp.h"

namespace {

constexpr int kKeyTile = 64;  // keys per tile: four 16-key vectors of scores
constexpr int kRows = 4;      // query rows per micro-tile of the score product

struct Shapes {
  int64_t B, Hq, Hk, S, D, G, Sp;  // Sp: S rounded up to the key tile
};

// 16 floats (the first `n` of them) -> 16 bf16, round to nearest even (as to_bf16), optionally scaled
inline __m256i bf16x16(const float* x, int64_t n, float scale = 1.f) {
  const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x), _mm512_set1_ps(scale)));
}

// keys g*16 .. g*16+15 of one (batch, KV head) -> their [D/2][16][2] bf16 slice of the packed keys (zero past S):
// each key row converted to bf16 once, then its 32-bit dim pairs transposed into key lanes
void pack_key_group(const float* k, int64_t ks2, const Shapes& s, int64_t g, uint16_t* out) {
  const int64_t pairs = s.D / 2;
  alignas(64) uint32_t rows[16][256];  // D <= 512
  for (int64_t j = 0; j < 16; ++j) {
    const int64_t key = g * 16 + j;
    for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
      const __m256i h = key < s.S ? bf16x16(k + key * ks2 + d0, s.D - d0) : _mm256_setzero_si256();
      _mm256_store_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(rows[j]) + d0), h);
    }
  }
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t t = 0; t < pairs; ++t)
    for (int64_t j = 0; j < 16; ++j) o[t * 16 + j] = rows[j][t];
}

// keys g*16 .. g*16+15 of one (batch, KV head) -> their [8 pairs][D][2] bf16 slice of the packed values (zero past
// S): the two keys of a pair interleaved per dim
void pack_value_group(const float* v, int64_t vs2, const Shapes& s, int64_t g, uint16_t* out) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < 8; ++p) {
    const int64_t key = g * 16 + 2 * p;
    for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
      const __m256i a = key < s.S ? bf16x16(v + key * vs2 + d0, s.D - d0) : _mm256_setzero_si256();
      const __m256i b = key + 1 < s.S ? bf16x16(v + (key + 1) * vs2 + d0, s.D - d0) : _mm256_setzero_si256();
      const __m512i ab = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
      _mm512_storeu_si512(out + (p * s.D + d0) * 2, ab);
    }
  }
}

// scores of kRows query rows (bf16, [rows][D]) against NV * 16 keys starting at 16-key group g0
template <int NV>
inline void scores(const uint16_t* q, int64_t D, const uint16_t* kp, int64_t g0, __m512 (&acc)[kRows][4]) {
  const int64_t pairs = D / 2;
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh kv[NV];
    for (int v = 0; v < NV; ++v)
      kv[v] = (__m512bh)_mm512_loadu_si512(kp + (((g0 + v) * pairs + t) * 16) * 2);
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * D + 2 * t, sizeof(pair));
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], kv[v], qb);
    }
  }
}

// out[R rows][DV * 16] += P[R rows][keys k0..k0+n) @ V, P as bf16 [rows][kKeyTile] (zero past n, n even)
template <int R, int DV>
inline void accumulate_values(const uint16_t* p, const uint16_t* vp, int64_t D, int64_t pair0, int64_t n_pairs,
                              float* o, int64_t o_stride) {
  for (int64_t c0 = 0; c0 < D; c0 += DV * 16) {
    __m512 acc[R][DV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * o_stride + c0 + 16 * c);
    for (int64_t j = 0; j < n_pairs; ++j) {
      __m512bh vv[DV];
      for (int c = 0; c < DV; ++c)
        vv[c] = (__m512bh)_mm512_loadu_si512(vp + ((pair0 + j) * D + c0 + 16 * c) * 2);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, p + r * kKeyTile + 2 * j, sizeof(pair));
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);
        for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vv[c], pb);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * o_stride + c0 + 16 * c, acc[r][c]);
  }
}

// Per-thread state of one query block: bf16 queries, running max / sum and fp32 outputs of its rows.
struct BlockState {
  std::vector<uint16_t> q, p;
  std::vector<float> m, l, o;
  void resize(int64_t rows, int64_t D) {
    q.assign(rows * D, 0);
    p.assign(kRows * kKeyTile, 0);
    m.assign(rows, -std::numeric_limits<float>::infinity());
    l.assign(rows, 0.f);
    o.assign(rows * D, 0.f);
  }
};

// One key tile [k0, k0 + n) (n <= kKeyTile, k0 % 16 == 0) for rows r0..r0+kRows of the block starting at query
// q0: scores, token mask (key >= lo, key < hi(row)), online softmax update, values.
template <int NV>
void tile(BlockState& st, int64_t r0, int64_t q0, int64_t k0, int64_t n, int64_t lo, bool causal, int64_t S,
          int64_t D, const uint16_t* kp, const uint16_t* vp) {
  __m512 acc[kRows][4];
  scores<NV>(st.q.data() + r0 * D, D, kp, k0 / 16, acc);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  std::memset(st.p.data(), 0, sizeof(uint16_t) * kRows * kKeyTile);
  float alpha[kRows];
  bool any_row = false;
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = q0 + r0 + r;
    const int64_t hi = std::min<int64_t>(causal ? row + 1 : S, k0 + n);
    __mmask16 keep[4];
    __m512 mx = ninf;
    for (int v = 0; v < NV; ++v) {
      const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(k0 + 16 * v)));
      keep[v] = _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(lo))) &
                _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(hi)));
      acc[r][v] = _mm512_mask_blend_ps(keep[v], ninf, acc[r][v]);
      mx = _mm512_max_ps(mx, acc[r][v]);
    }
    const float tile_max = _mm512_reduce_max_ps(mx);
    alpha[r] = 1.f;
    if (tile_max == -std::numeric_limits<float>::infinity()) continue;  // nothing visible to this row here
    any_row = true;
    const float m_old = st.m[r0 + r], m_new = std::max(m_old, tile_max);
    alpha[r] = m_old == -std::numeric_limits<float>::infinity() ? 0.f : optpass_vec::exp_nonpositive(m_old - m_new);
    st.m[r0 + r] = m_new;
    __m512 sum = _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __m512 w = _mm512_maskz_mov_ps(
          keep[v], optpass_vec::exp_nonpositive16(_mm512_sub_ps(acc[r][v], _mm512_set1_ps(m_new))));
      sum = _mm512_add_ps(sum, w);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(st.p.data() + r * kKeyTile + 16 * v),
                          (__m256i)_mm512_cvtneps_pbh(w));
    }
    st.l[r0 + r] = st.l[r0 + r] * alpha[r] + _mm512_reduce_add_ps(sum);
  }
  if (!any_row) return;
  for (int r = 0; r < kRows; ++r) {
    if (alpha[r] == 1.f) continue;
    float* o = st.o.data() + (r0 + r) * D;
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), a));
  }
  const int64_t n_pairs = (NV * 16) / 2;
  float* o = st.o.data() + r0 * D;
  if (D % 64 == 0)
    accumulate_values<kRows, 4>(st.p.data(), vp, D, k0 / 2, n_pairs, o, D);
  else if (D % 32 == 0)
    accumulate_values<kRows, 2>(st.p.data(), vp, D, k0 / 2, n_pairs, o, D);
  else
    accumulate_values<kRows, 1>(st.p.data(), vp, D, k0 / 2, n_pairs, o, D);
}

}  // namespace

// q [B, Hq, S, D], k / v [B, Hk, S', D] (S' >= S; keys 0..S-1 are used), float32, last dim contiguous.
// count [B or 1, Hq or 1, nQ] / index [B or 1, Hq or 1, nQ, nK] int32: each query block's key blocks (the first
// count entries of index); absent: every block (every block up to the diagonal if causal). starts [B] int64:
// the first real position of each row (left padding): keys before it are hidden, queries before it give zeros.
// Returns [B, S, Hq, D] (transformers' attention output layout).
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const c10::optional<torch::Tensor>& count, const c10::optional<torch::Tensor>& index,
                                const c10::optional<torch::Tensor>& starts, int64_t block, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention: 4-D q / k / v");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 inputs");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "prefill_attention: contiguous last dim");
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), 0, 0};
  TORCH_CHECK(s.D % 16 == 0 && s.D <= 512, "prefill_attention: head dim must be a multiple of 16");
  TORCH_CHECK(s.Hq % s.Hk == 0 && k.size(2) >= s.S && v.size(2) >= s.S && k.size(0) == s.B, "prefill_attention: shapes");
  TORCH_CHECK(block > 0 && block % 16 == 0, "prefill_attention: block must be a multiple of 16");
  s.G = s.Hq / s.Hk;
  s.Sp = (s.S + kKeyTile - 1) / kKeyTile * kKeyTile;
  const int64_t nQ = (s.S + block - 1) / block;
  const bool listed = count.has_value();
  TORCH_CHECK(listed == index.has_value(), "prefill_attention: count and index go together");
  torch::Tensor cnt, idx;
  if (listed) {
    cnt = count->to(at::kInt).expand({s.B, s.Hq, nQ}).contiguous();
    idx = index->to(at::kInt);
    idx = idx.expand({s.B, s.Hq, nQ, idx.size(-1)}).contiguous();
  }
  const int64_t nK = listed ? idx.size(-1) : nQ;
  torch::Tensor st = starts.has_value() ? starts->to(at::kLong).contiguous() : torch::zeros({s.B}, at::kLong);
  const int64_t* start = st.data_ptr<int64_t>();
  const int32_t* cp = listed ? cnt.data_ptr<int32_t>() : nullptr;
  const int32_t* ip = listed ? idx.data_ptr<int32_t>() : nullptr;

  const int64_t kpack = s.Sp * s.D;  // bf16 elements per (batch, KV head), keys and values alike
  std::vector<uint16_t> kp(s.B * s.Hk * kpack), vp(s.B * s.Hk * kpack);
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t groups = s.Sp / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < s.B * s.Hk * groups; ++task) {
    const int64_t bh = task / groups, g = task % groups, b = bh / s.Hk, h = bh % s.Hk;
    pack_key_group(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), s, g, kp.data() + bh * kpack + g * 16 * s.D);
    pack_value_group(vd + b * v.stride(0) + h * v.stride(1), v.stride(2), s, g, vp.data() + bh * kpack + g * 16 * s.D);
  }

  auto result = torch::empty({s.B, s.S, s.Hq, s.D}, q.options());
  float* out = result.data_ptr<float>();
  const int64_t tasks = s.B * s.Hq * nQ;
  const float sc = static_cast<float>(scale);
#pragma omp parallel num_threads(threads)
  {
    BlockState state;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      // the last query blocks first: under a causal layout they have the most keys
      const int64_t qb = nQ - 1 - t % nQ, hq = (t / nQ) % s.Hq, b = t / (nQ * s.Hq);
      const int64_t h = hq / s.G, q0 = qb * block, rows = std::min<int64_t>(block, s.S - q0);
      const int64_t padded_rows = (rows + kRows - 1) / kRows * kRows;
      state.resize(padded_rows, s.D);
      const float* qsrc = qd + b * q.stride(0) + hq * q.stride(1) + q0 * q.stride(2);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d0 = 0; d0 < s.D; d0 += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(state.q.data() + r * s.D + d0),
                              bf16x16(qsrc + r * q.stride(2) + d0, s.D - d0, sc));
      const int64_t lo = start[b];
      const uint16_t* kph = kp.data() + (b * s.Hk + h) * kpack;
      const uint16_t* vph = vp.data() + (b * s.Hk + h) * kpack;
      const int64_t n_blocks = listed ? cp[(b * s.Hq + hq) * nQ + qb] : (causal ? qb + 1 : nQ);
      const int32_t* list = listed ? ip + ((b * s.Hq + hq) * nQ + qb) * nK : nullptr;
      for (int64_t i = 0; i < n_blocks; ++i) {
        const int64_t kb = list ? list[i] : i;
        const int64_t kstart = std::max<int64_t>(kb * block, lo / 16 * 16);
        const int64_t kend = std::min<int64_t>({(kb + 1) * block, s.S, causal ? q0 + rows : s.S});
        for (int64_t k0 = kstart; k0 < kend; k0 += kKeyTile) {
          const int64_t n = std::min<int64_t>(kKeyTile, kend - k0);
          for (int64_t r0 = 0; r0 < padded_rows; r0 += kRows) {
            // causal: this row group sees keys up to its last row only (the diagonal tile's upper part is skipped)
            const int64_t seen = causal ? std::min<int64_t>(n, q0 + r0 + kRows - k0) : n;
            if (seen <= 0 || q0 + r0 + kRows <= lo) continue;  // every row before these keys, or padding
            const int nv = static_cast<int>((seen + 15) / 16);
            switch (nv) {
              case 1: tile<1>(state, r0, q0, k0, n, lo, causal, s.S, s.D, kph, vph); break;
              case 2: tile<2>(state, r0, q0, k0, n, lo, causal, s.S, s.D, kph, vph); break;
              case 3: tile<3>(state, r0, q0, k0, n, lo, causal, s.S, s.D, kph, vph); break;
              default: tile<4>(state, r0, q0, k0, n, lo, causal, s.S, s.D, kph, vph); break;
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* o = out + ((b * s.S + q0 + r) * s.Hq + hq) * s.D;
        const float l = state.l[r];
        const float inv = l > 0.f && q0 + r >= lo ? 1.f / l : 0.f;  // padding rows, rows that see no key: zeros
        for (int64_t d = 0; d < s.D; ++d) o[d] = state.o[r * s.D + d] * inv;
      }
    }
  }
  return result;
}

TORCH_LIBRARY_FRAGMENT(optpass, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? count, Tensor? index, Tensor? starts, int block, "
        "float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(optpass, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
#endif
