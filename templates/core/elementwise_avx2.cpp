// Row-wise and element-wise core ops. Plain loops written so g++ -O3 -mavx2 vectorizes them, and explicit
// vectors where the loop is exponentials (exp_avx2.h); rows or element ranges are split over the pool when a
// call is big enough to pay for it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core_ops.h"
#include "exp_avx2.h"
#include "qalora_common.h"
#include "cpu/threadpool.h"
#define QL_ISA_NS avx2
#include "cpu/vec8.h"

namespace qalora::core {
namespace {
constexpr int64_t ELEM_GRAIN = 1 << 15;
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, ELEM_GRAIN / std::max<int64_t>(1, dim)); }
}  // namespace

void embedding_forward(const float* table, const int32_t* ids, float* out, int64_t n, int64_t vocab, int64_t dim) {
  cpu_rt::parallel_range(n, row_grain(dim), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const int32_t id = ids[i];
      if (id < 0 || id >= vocab) std::memset(out + i * dim, 0, sizeof(float) * dim);  // callers validate ids
      else std::memcpy(out + i * dim, table + (int64_t)id * dim, sizeof(float) * dim);
    }
  });
}

void embedding_forward_half(const uint16_t* table, const int32_t* ids, float* out, int64_t n, int64_t vocab,
                            int64_t dim, bool bf16) {
  cpu_rt::parallel_range(n, row_grain(dim), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const int32_t id = ids[i];
      float* dst = out + i * dim;
      if (id < 0 || id >= vocab) {
        std::memset(dst, 0, sizeof(float) * dim);
        continue;
      }
      const uint16_t* src = table + (int64_t)id * dim;
      if (bf16) for (int64_t c = 0; c < dim; c++) dst[c] = qalora::bf16_to_f32(src[c]);
      else for (int64_t c = 0; c < dim; c++) dst[c] = qalora::f16_to_f32(src[c]);
    }
  });
}

void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t n, int64_t vocab, int64_t dim) {
  // Split over columns so rows hit by several ids never race.
  cpu_rt::parallel_range(dim, 64, [&](int64_t cb, int64_t ce) {
    for (int64_t i = 0; i < n; i++) {
      const int32_t id = ids[i];
      if (id < 0 || id >= vocab) continue;
      float* dst = dtable + (int64_t)id * dim;
      const float* src = dout + i * dim;
      for (int64_t c = cb; c < ce; c++) dst[c] += src[c];
    }
  });
}

namespace {
using cpu_isa::avx2::f8;

/// Eight rows of a [rows, dim] matrix, read a column block at a time with a lane per row. Rows past the end
/// repeat the first, and their lanes are ignored.
struct Rows8 {
  const float* p[8];
  Rows8(const float* m, int64_t r0, int64_t rows, int64_t dim) {
    for (int j = 0; j < 8; j++) p[j] = m + (r0 + j < rows ? r0 + j : r0) * dim;
  }
  /// c[t] ← column i + t of the eight rows, for t < n ≤ 8.
  void columns(int64_t i, int64_t n, f8 c[8]) const {
    if (n == 8) {
      for (int j = 0; j < 8; j++) c[j] = cpu_isa::avx2::f8_load(p[j] + i);
    } else {
      alignas(32) float t[8][8] = {};
      for (int j = 0; j < 8; j++) std::memcpy(t[j], p[j] + i, sizeof(float) * n);
      for (int j = 0; j < 8; j++) c[j] = cpu_isa::avx2::f8_load(t[j]);
    }
    cpu_isa::avx2::f8_transpose8(c);
  }
};

/// A product kept rounded on its own: the compiler may not fuse it into the add that follows.
inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

/// Per row, Σ_i term(column i) with the products rounded and added in index order, as the scalar loop
/// `s += a[i]·b[i]` computes it — eight rows side by side, a lane each, so each lane is bit for bit that row's
/// sum. A row alone is a chain of dependent adds, one add's latency per element; eight chains overlap.
template <class Term>
inline void ordered_row_sums(int64_t dim, const Rows8& a, const Rows8* b, Term term, float out[8]) {
  __m256 acc = _mm256_setzero_ps();
  f8 ca[8], cb[8] = {};  // cb stays zero without b: the term ignores it
  for (int64_t i = 0; i < dim; i += 8) {
    const int64_t n = std::min<int64_t>(8, dim - i);
    a.columns(i, n, ca);
    if (b) b->columns(i, n, cb);
    for (int64_t t = 0; t < n; t++) acc = _mm256_add_ps(acc, rounded(term(i + t, ca[t].v, cb[t].v)));
  }
  _mm256_storeu_ps(out, acc);
}
}  // namespace

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t dim, float eps) {
  cpu_rt::parallel_range((rows + 7) / 8, std::max<int64_t>(1, row_grain(dim) / 8), [&](int64_t b, int64_t e) {
    for (int64_t r0 = 8 * b; r0 < std::min(rows, 8 * e); r0 += 8) {
      float ss[8];
      ordered_row_sums(dim, Rows8(x, r0, rows, dim), nullptr, [](int64_t, __m256 v, __m256) { return _mm256_mul_ps(v, v); }, ss);
      for (int64_t r = r0; r < std::min(rows, r0 + 8); r++) {
        const float* xr = x + r * dim;
        const float s = 1.0f / std::sqrt(ss[r - r0] / (float)dim + eps);
        rstd[r] = s;
        float* yr = y + r * dim;
        for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (s * xr[i]);
      }
    }
  });
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int64_t rows,
                      int64_t dim) {
  cpu_rt::parallel_range((rows + 7) / 8, std::max<int64_t>(1, row_grain(dim) / 8), [&](int64_t b, int64_t e) {
    for (int64_t r0 = 8 * b; r0 < std::min(rows, 8 * e); r0 += 8) {
      float dot[8];
      const Rows8 dys(dy, r0, rows, dim);
      const Rows8 xs(x, r0, rows, dim);
      ordered_row_sums(dim, dys, &xs, [w](int64_t i, __m256 d, __m256 xv) {
        return _mm256_mul_ps(rounded(_mm256_mul_ps(d, _mm256_broadcast_ss(w + i))), xv);
      }, dot);
      for (int64_t r = r0; r < std::min(rows, r0 + 8); r++) {
        const float* xr = x + r * dim;
        const float* dyr = dy + r * dim;
        const float s = rstd[r];
        const float c = dot[r - r0] * s * s * s / (float)dim;
        float* dxr = dx + r * dim;
        for (int64_t i = 0; i < dim; i++) dxr[i] = s * w[i] * dyr[i] - c * xr[i];
      }
    }
  });
}

namespace {
// Rotates each head's pairs by ±pos·θ^(-2j/d): pairs (2j, 2j+1) in the Meta layout, (j, j + d/2) in HF's.
void rope(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta, bool rotate_half,
          float sign) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int64_t j = 0; j < half; j++) inv_freq[j] = 1.0f / std::pow(theta, (float)(2 * j) / (float)head_dim);
  // cos and sin once per position, not per row: a training batch repeats its positions once per sequence.
  // (The same expressions either way, so the same bits.)
  int64_t p0 = 0, p1 = -1;
  if (rows > 0) {
    const auto [lo, hi] = std::minmax_element(pos, pos + rows);
    p0 = *lo, p1 = *hi;
  }
  const bool table = p1 - p0 + 1 <= rows;
  std::vector<float> cs_all(table ? (size_t)((p1 - p0 + 1) * half) : 0), sn_all(cs_all.size());
  const auto angles = [&](int64_t p, float* cs, float* sn) {
    for (int64_t j = 0; j < half; j++) {
      const float a = (float)p * inv_freq[j];
      cs[j] = std::cos(a);
      sn[j] = sign * std::sin(a);
    }
  };
  if (table)
    cpu_rt::parallel_range(p1 - p0 + 1, row_grain(half * 32), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; p++) angles(p0 + p, cs_all.data() + p * half, sn_all.data() + p * half);
    });
  cpu_rt::parallel_range(rows, row_grain(heads * head_dim * (table ? 1 : 8)), [&](int64_t b, int64_t e) {
    std::vector<float> row_cs(table ? 0 : half), row_sn(table ? 0 : half);
    for (int64_t r = b; r < e; r++) {
      const float* cs = table ? cs_all.data() + (pos[r] - p0) * half : row_cs.data();
      const float* sn = table ? sn_all.data() + (pos[r] - p0) * half : row_sn.data();
      if (!table) angles(pos[r], row_cs.data(), row_sn.data());
      for (int64_t h = 0; h < heads; h++) {
        float* v = x + (r * heads + h) * head_dim;
        for (int64_t j = 0; j < half; j++) {
          const int64_t i0 = rotate_half ? j : 2 * j, i1 = rotate_half ? j + half : 2 * j + 1;
          const float v0 = v[i0], v1 = v[i1];
          v[i0] = v0 * cs[j] - v1 * sn[j];
          v[i1] = v0 * sn[j] + v1 * cs[j];
        }
      }
    }
  });
}
}  // namespace

void rope_forward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                  bool rotate_half) {
  rope(x, pos, rows, heads, head_dim, theta, rotate_half, 1.0f);
}

// The rotation is orthogonal: its gradient is the inverse rotation.
void rope_backward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                   bool rotate_half) {
  rope(dx, pos, rows, heads, head_dim, theta, rotate_half, -1.0f);
}

namespace {
/// f(i0, lanes) over [0, n) in vectors of 8 lanes, split over the pool; the last partial vector goes through
/// `f` too (on padded copies: see lanes8), so every element takes the same arithmetic.
template <class F>
void eight_at_a_time(int64_t n, F f) {
  cpu_rt::parallel_range((n + 7) / 8, ELEM_GRAIN / 8, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; v++) f(v * 8, std::min<int64_t>(8, n - v * 8));
  });
}

/// Eight lanes of x from i (zeros past `lanes`), and their store back.
inline __m256 lanes8(const float* x, int64_t i, int64_t lanes) {
  if (lanes == 8) return _mm256_loadu_ps(x + i);
  float t[8] = {};
  std::memcpy(t, x + i, sizeof(float) * lanes);
  return _mm256_loadu_ps(t);
}
inline void store8(float* y, int64_t i, int64_t lanes, __m256 v) {
  if (lanes == 8) return _mm256_storeu_ps(y + i, v);
  float t[8];
  _mm256_storeu_ps(t, v);
  std::memcpy(y + i, t, sizeof(float) * lanes);
}

/// σ(g) = 1 / (1 + e^−g).
inline __m256 sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
}  // namespace

void swiglu_forward(const float* gate, const float* up, float* out, int64_t n) {
  eight_at_a_time(n, [&](int64_t i, int64_t lanes) {
    const __m256 g = lanes8(gate, i, lanes);
    store8(out, i, lanes, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), lanes8(up, i, lanes)));
  });
}

void swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  eight_at_a_time(n, [&](int64_t i, int64_t lanes) {
    const __m256 g = lanes8(gate, i, lanes), s = sigmoid8(g), d = lanes8(dout, i, lanes);
    store8(dup, i, lanes, _mm256_mul_ps(_mm256_mul_ps(d, g), s));
    // d·up·σ·(1 + g·(1 − σ))
    const __m256 tail = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);
    store8(dgate, i, lanes, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(d, lanes8(up, i, lanes)), s), tail));
  });
}

namespace {
// Loss of one row (max-shifted log-sum-exp, summed in double) and, when `grad`, its softmax gradient. The
// exponentials are computed once, into grad when there is one (grad may alias z: z[target] is read first).
double ce_row(const float* z, int32_t target, int64_t vocab, float scale, float* grad) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= vocab; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(z + i));
  float mx = max8(m8);
  for (; i < vocab; i++) mx = std::max(mx, z[i]);
  const float zt = z[target];
  // e^(z − max) eight at a time (the last partial vector on a padded copy), summed in double.
  __m256d sum4 = _mm256_setzero_pd();
  const __m256 mxv = _mm256_set1_ps(mx);
  for (i = 0; i < vocab; i += 8) {
    const int64_t lanes = std::min<int64_t>(8, vocab - i);
    __m256 e = exp8(_mm256_sub_ps(lanes8(z, i, lanes), mxv));
    if (lanes < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
    if (grad) store8(grad, i, lanes, e);
    sum4 = _mm256_add_pd(sum4, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e)), _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1))));
  }
  double lanes4[4];
  _mm256_storeu_pd(lanes4, sum4);
  const double sum = (lanes4[0] + lanes4[1]) + (lanes4[2] + lanes4[3]);
  if (grad) {
    const __m256 k = _mm256_set1_ps((float)(scale / sum));
    for (i = 0; i < vocab; i += 8) {
      const int64_t lanes = std::min<int64_t>(8, vocab - i);
      store8(grad, i, lanes, _mm256_mul_ps(lanes8(grad, i, lanes), k));
    }
    grad[target] -= scale;
  }
  return (double)mx + std::log(sum) - (double)zt;
}

double cross_entropy(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float scale,
                     float* dlogits) {
  std::vector<double> partial(n, 0.0);
  cpu_rt::parallel_range(n, row_grain(vocab * 4), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const int32_t t = targets[r];
      float* g = dlogits ? dlogits + r * vocab : nullptr;
      if (t < 0 || t >= vocab) {  // ignored position
        if (g) std::memset(g, 0, sizeof(float) * vocab);
        continue;
      }
      partial[r] = ce_row(logits + r * vocab, t, vocab, scale, g);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}
}  // namespace

double cross_entropy_forward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab) {
  return cross_entropy(logits, targets, n, vocab, 0.f, nullptr);
}

double cross_entropy_backward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float scale,
                              float* dlogits) {
  return cross_entropy(logits, targets, n, vocab, scale, dlogits);
}

void add_inplace(float* y, const float* x, int64_t n) {
  cpu_rt::parallel_range(n, ELEM_GRAIN * 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) y[i] += x[i];
  });
}

namespace {
/// y[i] = one(x[i]) over the pool; `one` is a lambda so the conversion inlines into the loop.
template <class In, class Out, class One>
void convert(const In* x, Out* y, int64_t n, One one) {
  cpu_rt::parallel_range(n, ELEM_GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) y[i] = one(x[i]);
  });
}
}  // namespace

void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  convert(x, y, n, [](float v) { return qalora::f32_to_f16(v); });
}
void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  convert(x, y, n, [](uint16_t v) { return qalora::f16_to_f32(v); });
}
void f32_to_bf16(const float* x, uint16_t* y, int64_t n) {
  convert(x, y, n, [](float v) { return qalora::f32_to_bf16(v); });
}
void bf16_to_f32(const uint16_t* x, float* y, int64_t n) {
  convert(x, y, n, [](uint16_t v) { return qalora::bf16_to_f32(v); });
}

}  // namespace qalora::core
