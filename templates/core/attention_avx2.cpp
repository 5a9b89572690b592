// Causal grouped-query attention. Training and prefill share one kernel: tq queries are the last tq of tk
// positions (query t sees keys s ≤ t + tk − tq). Backward recomputes probabilities from the saved
// log-sum-exp instead of storing the [tq, tk] matrix, so memory stays linear in the sequence.
//
// Two ways through the same math. A few query rows (decode), or a head size that is not a multiple of 8, go a
// row at a time: a dot product per key. Blocks of BQ query rows (prefill, training) go through small
// register-blocked products instead — S = Q·Kᵀ and O = P·V forward; dP = dO·Vᵀ, dQ = dS·K, dK += dSᵀ·Q and
// dV += Pᵀ·dO backward — with K and V transposed once per call and the exponentials eight at a time: a dot
// product per key spends its time on horizontal sums and std::exp, not on multiply-adds.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core_ops.h"
#include "exp_avx2.h"
#include "cpu/threadpool.h"

namespace qalora::core {
namespace {
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
  if (n >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = sum8(acc);
  }
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}
// y += a·x
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  int64_t i = 0;
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

/// dk, dv of one (batch, kv head) ← 0: tk rows of head_dim, ks apart (backward accumulates into them).
inline void zero_head_rows(float* dkb, float* dvb, int64_t tk, int64_t ks, int64_t head_dim) {
  for (int64_t s = 0; s < tk; s++) {
    std::memset(dkb + s * ks, 0, sizeof(float) * head_dim);
    std::memset(dvb + s * ks, 0, sizeof(float) * head_dim);
  }
}

// ---- a query row at a time ----------------------------------------------------------------------------------

void forward_rows(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch, int64_t tq,
                  int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t group = heads / kv_heads, offset = tk - tq;
  const int64_t qs = heads * head_dim, ks = kv_heads * head_dim;  // row strides
  const float scale = 1.0f / std::sqrt((float)head_dim);
  const int64_t tasks = batch * heads * tq;
  // A task is one query row of one head (~tk·head_dim multiply-adds, twice); decode-sized calls stay on one
  // thread, where waking the pool would cost more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, tk * head_dim));
  cpu_rt::parallel_range(tasks, grain, [&](int64_t tb, int64_t te) {
    std::vector<float> score(tk);
    for (int64_t task = tb; task < te; task++) {
      const int64_t t = task % tq, h = (task / tq) % heads, b = task / (tq * heads);
      const int64_t kvh = h / group, last = t + offset;
      const float* qv = q + (b * tq + t) * qs + h * head_dim;
      const float* kb = k + b * tk * ks + kvh * head_dim;
      const float* vb = v + b * tk * ks + kvh * head_dim;
      float mx = -INFINITY;
      for (int64_t s = 0; s <= last; s++) {
        score[s] = dot(qv, kb + s * ks, head_dim) * scale;
        mx = std::max(mx, score[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s <= last; s++) {
        score[s] = std::exp(score[s] - mx);
        sum += score[s];
      }
      float* o = out + (b * tq + t) * qs + h * head_dim;
      std::memset(o, 0, sizeof(float) * head_dim);
      const float inv = 1.0f / sum;
      for (int64_t s = 0; s <= last; s++) axpy(o, score[s] * inv, vb + s * ks, head_dim);
      lse[(b * tq + t) * heads + h] = mx + std::log(sum);
    }
  });
}

void backward_rows(const float* q, const float* k, const float* v, const float* out, const float* lse,
                   const float* dout, float* dq, float* dk, float* dv, int64_t batch, int64_t tq, int64_t tk,
                   int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t group = heads / kv_heads, offset = tk - tq;
  const int64_t qs = heads * head_dim, ks = kv_heads * head_dim;
  const float scale = 1.0f / std::sqrt((float)head_dim);
  // One task per (batch, kv head): it owns that head's dk/dv rows, so query heads sharing it never race.
  const int64_t work = tq * tk * head_dim * group;  // per task, roughly
  cpu_rt::parallel_range(batch * kv_heads, std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, work)), [&](int64_t tb, int64_t te) {
    for (int64_t task = tb; task < te; task++) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const float* kb = k + b * tk * ks + kvh * head_dim;
      const float* vb = v + b * tk * ks + kvh * head_dim;
      float* dkb = dk + b * tk * ks + kvh * head_dim;
      float* dvb = dv + b * tk * ks + kvh * head_dim;
      zero_head_rows(dkb, dvb, tk, ks, head_dim);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int64_t t = 0; t < tq; t++) {
          const int64_t row = b * tq + t, last = t + offset;
          const float* qv = q + row * qs + h * head_dim;
          const float* dov = dout + row * qs + h * head_dim;
          const float D = dot(dov, out + row * qs + h * head_dim, head_dim);
          const float l = lse[row * heads + h];
          float* dqv = dq + row * qs + h * head_dim;
          std::memset(dqv, 0, sizeof(float) * head_dim);
          for (int64_t s = 0; s <= last; s++) {
            const float* ksv = kb + s * ks;
            const float p = std::exp(dot(qv, ksv, head_dim) * scale - l);
            const float ds = p * (dot(dov, vb + s * ks, head_dim) - D) * scale;
            axpy(dvb + s * ks, p, dov, head_dim);
            axpy(dqv, ds, ksv, head_dim);
            axpy(dkb + s * ks, ds, qv, head_dim);
          }
        }
      }
    }
  });
}

// ---- blocks of query rows -----------------------------------------------------------------------------------

/// Query rows per block: a block's scores [BQ, keys] stay in L2 while its products read them.
constexpr int64_t BQ = 32;
/// Fewer query rows than this (decode, short prefills) go a row at a time.
constexpr int64_t kMinBlockedRows = 8;

/// A matrix as the small products read it: element (i, k) at p[i·rs + k·cs] (cs = 1 row-major, rs = 1 for Aᵀ).
struct Mat {
  const float* p;
  int64_t rs, cs;
};

/// C[R][8V] (+)= A[R][K]·B[K][8V] (B's rows ldb apart): R·V accumulators, each B load serving R rows.
template <int R, int V>
inline void tile(int64_t K, Mat A, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m256 c[R][V];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    __m256 b[V];
    for (int v = 0; v < V; v++) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
      const __m256 a = _mm256_broadcast_ss(A.p + r * A.rs + k * A.cs);
      for (int v = 0; v < V; v++) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

/// C[M][N] (+)= A[M][K]·B[K][N] for N a multiple of 8, in 4×16 tiles (narrower at the edges).
void small_gemm(int64_t M, int64_t N, int64_t K, Mat A, const float* B, int64_t ldb, float* C, int64_t ldc,
                bool accumulate) {
  for (int64_t j = 0; j < N; j += 16) {
    const bool wide = j + 16 <= N;
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      const Mat a{A.p + i * A.rs, A.rs, A.cs};
      if (wide) tile<4, 2>(K, a, B + j, ldb, C + i * ldc + j, ldc, accumulate);
      else tile<4, 1>(K, a, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    }
    for (; i < M; i++) {
      const Mat a{A.p + i * A.rs, A.rs, A.cs};
      if (wide) tile<1, 2>(K, a, B + j, ldb, C + i * ldc + j, ldc, accumulate);
      else tile<1, 1>(K, a, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    }
  }
}

/// [b][kvh][d][tkp] from [b][t][kvh][d]: the keys (or values) of each kv head as rows of head_dim, keys padded
/// with zeros to tkp (a multiple of 8), so a score row is a product with contiguous 8-key vectors.
std::vector<float> transposed(const float* x, int64_t batch, int64_t tk, int64_t kv_heads, int64_t head_dim,
                              int64_t tkp) {
  std::vector<float> t((size_t)(batch * kv_heads * head_dim * tkp), 0.f);
  const int64_t ks = kv_heads * head_dim;
  cpu_rt::parallel_range(batch * kv_heads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t task = tb; task < te; task++) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      float* dst = t.data() + task * head_dim * tkp;
      for (int64_t s = 0; s < tk; s++) {
        const float* src = x + (b * tk + s) * ks + kvh * head_dim;
        for (int64_t d = 0; d < head_dim; d++) dst[d * tkp + s] = src[d];
      }
    }
  });
  return t;
}

/// row[s] ← e^(row[s]·scale − sub) for s < count, 0 for count ≤ s < n8; returns the sum of the exponentials.
inline float exp_row(float* row, int64_t count, int64_t n8, float scale, float sub) {
  const __m256 sc = _mm256_set1_ps(scale), sb = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t s = 0; s < n8; s += 8) {
    __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(row + s), sc, sb));
    if (s + 8 > count) {  // the causal edge: keys past the row's last are masked to zero
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count - s)), lane));
      e = _mm256_and_ps(e, keep);
    }
    _mm256_storeu_ps(row + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  return sum8(acc);
}

/// max of row[0, count).
inline float row_max(const float* row, int64_t count) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= count; s += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + s));
  float mx = max8(m);
  for (; s < count; s++) mx = std::max(mx, row[s]);
  return mx;
}

/// Where one block of query rows of one head sits, and the keys it sees.
struct Block {
  int64_t b, h, kvh;
  int64_t row0;  // the block's first query row in [batch·tq]: row0 = b·tq + t0
  int64_t t0, rows, offset, keys, keys8;
  Block(int64_t b_, int64_t h_, int64_t blk, int64_t tq, int64_t tk, int64_t group)
      : b(b_), h(h_), kvh(h_ / group), row0(b_ * tq + blk * BQ), t0(blk * BQ), rows(std::min(BQ, tq - t0)),
        offset(tk - tq), keys(std::min(tk, t0 + rows + offset)), keys8((keys + 7) / 8 * 8) {}
  /// Keys row r of the block sees: s ≤ t0 + r + offset.
  int64_t seen(int64_t r) const { return t0 + r + offset + 1; }
};

/// scores [rows, keys8] (row stride tkp) = Q·Kᵀ of one block, unscaled.
inline void block_scores(const Block& blk, const float* q, const float* kt, int64_t qs, int64_t kv_heads,
                         int64_t head_dim, int64_t tkp, float* scores) {
  const float* qb = q + blk.row0 * qs + blk.h * head_dim;
  const float* ktb = kt + (blk.b * kv_heads + blk.kvh) * head_dim * tkp;
  small_gemm(blk.rows, blk.keys8, head_dim, {qb, qs, 1}, ktb, tkp, scores, tkp, false);
}

void forward_blocked(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                     int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t group = heads / kv_heads, qs = heads * head_dim, ks = kv_heads * head_dim;
  const int64_t tkp = (tk + 7) / 8 * 8, blocks = (tq + BQ - 1) / BQ;
  const float scale = 1.0f / std::sqrt((float)head_dim);
  const std::vector<float> kt = transposed(k, batch, tk, kv_heads, head_dim, tkp);
  cpu_rt::parallel_range(batch * heads * blocks, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> p((size_t)(BQ * tkp));
    float inv[BQ];
    for (int64_t task = tb; task < te; task++) {
      const Block blk(task / (heads * blocks), (task / blocks) % heads, task % blocks, tq, tk, group);
      block_scores(blk, q, kt.data(), qs, kv_heads, head_dim, tkp, p.data());
      for (int64_t r = 0; r < blk.rows; r++) {
        float* row = p.data() + r * tkp;
        const int64_t seen = blk.seen(r);
        const float mx = row_max(row, seen) * scale;  // scale > 0: the max of the scaled scores
        const float sum = exp_row(row, seen, blk.keys8, scale, mx);
        inv[r] = 1.0f / sum;
        lse[(blk.row0 + r) * heads + blk.h] = mx + std::log(sum);
      }
      float* o = out + blk.row0 * qs + blk.h * head_dim;
      const float* vb = v + blk.b * tk * ks + blk.kvh * head_dim;
      small_gemm(blk.rows, head_dim, blk.keys, {p.data(), tkp, 1}, vb, ks, o, qs, false);
      for (int64_t r = 0; r < blk.rows; r++) {
        const __m256 iv = _mm256_set1_ps(inv[r]);
        for (int64_t d = 0; d < head_dim; d += 8)
          _mm256_storeu_ps(o + r * qs + d, _mm256_mul_ps(iv, _mm256_loadu_ps(o + r * qs + d)));
      }
    }
  });
}

void backward_blocked(const float* q, const float* k, const float* v, const float* out, const float* lse,
                      const float* dout, float* dq, float* dk, float* dv, int64_t batch, int64_t tq, int64_t tk,
                      int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t group = heads / kv_heads, qs = heads * head_dim, ks = kv_heads * head_dim;
  const int64_t tkp = (tk + 7) / 8 * 8, blocks = (tq + BQ - 1) / BQ;
  const float scale = 1.0f / std::sqrt((float)head_dim);
  const std::vector<float> kt = transposed(k, batch, tk, kv_heads, head_dim, tkp);
  const std::vector<float> vt = transposed(v, batch, tk, kv_heads, head_dim, tkp);
  // One task per (batch, kv head): it owns that head's dk/dv rows, so query heads sharing it never race.
  cpu_rt::parallel_range(batch * kv_heads, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> p((size_t)(BQ * tkp)), ds((size_t)(BQ * tkp));
    for (int64_t task = tb; task < te; task++) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const float* kb = k + b * tk * ks + kvh * head_dim;
      float* dkb = dk + b * tk * ks + kvh * head_dim;
      float* dvb = dv + b * tk * ks + kvh * head_dim;
      zero_head_rows(dkb, dvb, tk, ks, head_dim);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int64_t bi = 0; bi < blocks; bi++) {
          const Block blk(b, h, bi, tq, tk, group);
          const int64_t at = blk.row0 * qs + h * head_dim;
          // P from the saved log-sum-exp, dP = dO·Vᵀ, then dS = P∘(dP − D)·scale with D = dO·O per row.
          block_scores(blk, q, kt.data(), qs, kv_heads, head_dim, tkp, p.data());
          small_gemm(blk.rows, blk.keys8, head_dim, {dout + at, qs, 1}, vt.data() + task * head_dim * tkp, tkp,
                     ds.data(), tkp, false);
          for (int64_t r = 0; r < blk.rows; r++) {
            float* pr = p.data() + r * tkp;
            float* dr = ds.data() + r * tkp;
            exp_row(pr, blk.seen(r), blk.keys8, scale, lse[(blk.row0 + r) * heads + h]);
            const __m256 D = _mm256_set1_ps(dot(dout + at + r * qs, out + at + r * qs, head_dim));
            const __m256 sc = _mm256_set1_ps(scale);
            for (int64_t s = 0; s < blk.keys8; s += 8) {
              const __m256 pv = _mm256_loadu_ps(pr + s);
              _mm256_storeu_ps(dr + s, _mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dr + s), D)), sc));
            }
          }
          small_gemm(blk.rows, head_dim, blk.keys, {ds.data(), tkp, 1}, kb, ks, dq + at, qs, false);
          small_gemm(blk.keys, head_dim, blk.rows, {ds.data(), 1, tkp}, q + at, qs, dkb, ks, true);
          small_gemm(blk.keys, head_dim, blk.rows, {p.data(), 1, tkp}, dout + at, qs, dvb, ks, true);
        }
      }
    }
  });
}
}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (tq >= kMinBlockedRows && head_dim % 8 == 0) forward_blocked(q, k, v, out, lse, batch, tq, tk, heads, kv_heads, head_dim);
  else forward_rows(q, k, v, out, lse, batch, tq, tk, heads, kv_heads, head_dim);
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                        const float* dout, float* dq, float* dk, float* dv, int64_t batch, int64_t tq, int64_t tk,
                        int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (tq >= kMinBlockedRows && head_dim % 8 == 0)
    backward_blocked(q, k, v, out, lse, dout, dq, dk, dv, batch, tq, tk, heads, kv_heads, head_dim);
  else backward_rows(q, k, v, out, lse, dout, dq, dk, dv, batch, tq, tk, heads, kv_heads, head_dim);
}

void attention_forward_kv16(const float* q, const uint16_t* k, const uint16_t* v, float* out, float* lse, int64_t batch,
                            int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t n = batch * tk * kv_heads * head_dim;
  std::vector<float> kf(n), vf(n);
  f16_to_f32(k, kf.data(), n);
  f16_to_f32(v, vf.data(), n);
  attention_forward(q, kf.data(), vf.data(), out, lse, batch, tq, tk, heads, kv_heads, head_dim);
}

}  // namespace qalora::core
