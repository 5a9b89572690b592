// Causal grouped-query attention. Training and prefill share one kernel: tq queries are the last tq of tk
// positions (query t sees keys s ≤ t + tk − tq). Backward recomputes probabilities from the saved
// log-sum-exp instead of storing the [tq, tk] matrix, so memory stays linear in the sequence.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core_ops.h"
#include "cpu/threadpool.h"

namespace qalora::core {
namespace {
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
  if (n >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
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
}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
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

void attention_forward_kv16(const float* q, const uint16_t* k, const uint16_t* v, float* out, float* lse, int64_t batch,
                            int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t n = batch * tk * kv_heads * head_dim;
  std::vector<float> kf(n), vf(n);
  f16_to_f32(k, kf.data(), n);
  f16_to_f32(v, vf.data(), n);
  attention_forward(q, kf.data(), vf.data(), out, lse, batch, tq, tk, heads, kv_heads, head_dim);
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
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
      for (int64_t s = 0; s < tk; s++) {
        std::memset(dkb + s * ks, 0, sizeof(float) * head_dim);
        std::memset(dvb + s * ks, 0, sizeof(float) * head_dim);
      }
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

}  // namespace qalora::core
