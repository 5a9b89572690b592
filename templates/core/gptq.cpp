// GPTQ (Frantar et al. 2022) with contiguous groups and act-order off, as the QA-LoRA paper quantized its bases,
// writing our (q blocked32, α, β) layout. Rows of W are independent in GPTQ, so they run in parallel chunks;
// columns go left to right with lazy batch updates (blocks of B columns, B a multiple of the group, so a group
// never straddles blocks and its min-max sees fully error-compensated weights when the group is entered).
// The O(in³) factorisation (U = upper Cholesky factor of (H + λI)⁻¹) is blocked onto the core GEMM in fp32, as
// GPTQ's reference does it in fp32 torch; small diagonal blocks accumulate in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core_ops.h"
#include "cpu/threadpool.h"
#include "qalora_common.h"

// Vectorise the update loops with AVX2 but without FMA: ŵ = α·q + β must round like the reference (no fusing).
#pragma GCC target("avx2")

namespace qalora::core {
namespace {

using cpu_rt::parallel_range;

// Dense blocks are row-major with a leading dimension; the O(n³) work goes through the core GEMM on contiguous
// copies, recursively halving down to NB, where small unblocked loops (double accumulation) finish.
constexpr int64_t NB = 64;

std::vector<float> take(const float* a, int64_t ld, int64_t rows, int64_t cols) {
  std::vector<float> out((size_t)(rows * cols));
  for (int64_t i = 0; i < rows; i++) std::memcpy(out.data() + i * cols, a + i * ld, sizeof(float) * (size_t)cols);
  return out;
}

void put(const std::vector<float>& src, int64_t rows, int64_t cols, float* a, int64_t ld, float sign) {
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) a[i * ld + j] = sign * src[(size_t)(i * cols + j)];
}

// Lower Cholesky of a small block in place. False when a pivot is not positive.
bool chol_small(float* a, int64_t n, int64_t ld) {
  for (int64_t j = 0; j < n; j++) {
    float* rj = a + j * ld;
    double s = rj[j];
    for (int64_t k = 0; k < j; k++) s -= (double)rj[k] * rj[k];
    if (!(s > 0) || !std::isfinite(s)) return false;
    const double d = std::sqrt(s);
    rj[j] = (float)d;
    for (int64_t i = j + 1; i < n; i++) {
      float* ri = a + i * ld;
      double t = ri[j];
      for (int64_t k = 0; k < j; k++) t -= (double)ri[k] * rj[k];
      ri[j] = (float)(t / d);
    }
  }
  return true;
}

// Inverse of a small lower-triangular block in place.
void trinv_small(float* a, int64_t n, int64_t ld) {
  std::vector<double> x((size_t)(n * n), 0.0);
  for (int64_t j = 0; j < n; j++) {
    x[j * n + j] = 1.0 / a[j * ld + j];
    for (int64_t i = j + 1; i < n; i++) {
      double t = 0;
      for (int64_t k = j; k < i; k++) t += (double)a[i * ld + k] * x[k * n + j];
      x[i * n + j] = -t / a[i * ld + i];
    }
  }
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j <= i; j++) a[i * ld + j] = (float)x[i * n + j];
}

// Lower-triangular inverse: X11 = L11⁻¹, X22 = L22⁻¹, X21 = −X22·L21·X11. Upper triangle must be zero.
void trinv(float* a, int64_t n, int64_t ld) {
  if (n <= NB) return trinv_small(a, n, ld);
  const int64_t n1 = (n / 2 + 7) / 8 * 8, n2 = n - n1;
  float* a21 = a + n1 * ld;
  float* a22 = a21 + n1;
  trinv(a, n1, ld);
  trinv(a22, n2, ld);
  const auto x11 = take(a, ld, n1, n1), l21 = take(a21, ld, n2, n1), x22 = take(a22, ld, n2, n2);
  std::vector<float> t((size_t)(n2 * n1)), x21((size_t)(n2 * n1));
  gemm(l21.data(), x11.data(), t.data(), n2, n1, n1, false, false, false);
  gemm(x22.data(), t.data(), x21.data(), n2, n1, n2, false, false, false);
  put(x21, n2, n1, a21, ld, -1.0f);
}

// Lower Cholesky: L11 = chol(A11), L21 = A21·L11⁻ᵀ, L22 = chol(A22 − L21·L21ᵀ). Upper triangle must be zero.
bool chol(float* a, int64_t n, int64_t ld) {
  if (n <= NB) return chol_small(a, n, ld);
  const int64_t n1 = (n / 2 + 7) / 8 * 8, n2 = n - n1;
  float* a21 = a + n1 * ld;
  float* a22 = a21 + n1;
  if (!chol(a, n1, ld)) return false;
  auto x11 = take(a, ld, n1, n1);
  trinv(x11.data(), n1, n1);
  const auto a21c = take(a21, ld, n2, n1);
  std::vector<float> l21((size_t)(n2 * n1)), c((size_t)(n2 * n2));
  gemm(a21c.data(), x11.data(), l21.data(), n2, n1, n1, false, true, false);
  put(l21, n2, n1, a21, ld, 1.0f);
  gemm(l21.data(), l21.data(), c.data(), n2, n2, n1, false, true, false);
  parallel_range(n2, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++)
      for (int64_t j = 0; j <= i; j++) a22[i * ld + j] -= c[(size_t)(i * n2 + j)];
  });
  return chol(a22, n2, ld);
}

// U (upper) with H⁻¹ = UᵀU, H damped by `damp` times its mean diagonal. With J the reversal, chol(J·H·J) = L'
// gives H = M·Mᵀ for the upper M = J·L'·J, so U = M⁻¹ = J·L'⁻¹·J: one Cholesky and one triangular inverse.
bool inverse_cholesky_upper(const float* h, int64_t n, double damp, float* a, float* u) {
  double mean = 0;
  for (int64_t i = 0; i < n; i++) mean += h[i * n + i];
  mean /= (double)n;
  for (int64_t i = 0; i < n; i++) {
    for (int64_t j = 0; j <= i; j++) a[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
    for (int64_t j = i + 1; j < n; j++) a[i * n + j] = 0;
    const float hd = h[(n - 1 - i) * n + (n - 1 - i)];
    // A dead input (never non-zero) gets 1 on the diagonal; the caller zeroes its weights.
    a[i * n + i] = (float)((hd == 0 ? 1.0 : (double)hd) + damp * mean);
  }
  if (!chol(a, n, n)) return false;
  trinv(a, n, n);
  for (int64_t i = 0; i < n; i++) {
    for (int64_t j = 0; j < i; j++) u[i * n + j] = 0;
    for (int64_t j = i; j < n; j++) u[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
  }
  for (int64_t i = 0; i < n * n; i++)
    if (!std::isfinite(u[i])) return false;
  return true;
}

// Min-max (α, β) of one row's group, in fp32 steps as qalora_common.h specifies.
inline void group_params(const float* w, int64_t g, int qmax, float* alpha, float* beta) {
  float mn = w[0], mx = w[0];
  for (int64_t i = 1; i < g; i++) {
    mn = std::min(mn, w[i]);
    mx = std::max(mx, w[i]);
  }
  *alpha = mx == mn ? 1.0f : (mx - mn) / (float)qmax;
  *beta = mn;
}

}  // namespace

void gptq_hessian_accumulate(const float* x, int64_t rows, int64_t in, float* h, int64_t seen) {
  if (rows <= 0) return;
  std::vector<float> xtx((size_t)(in * in));
  gemm(x, x, xtx.data(), in, in, rows, /*trans_a=*/true, /*trans_b=*/false, /*accumulate=*/false);
  const float keep = (float)((double)seen / (double)(seen + rows));
  const float add = (float)(2.0 / (double)(seen + rows));
  parallel_range(in * in, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) h[i] = h[i] * keep + xtx[i] * add;
  });
}

double gptq_quantize(float* w, const float* h, int64_t out, int64_t in, int32_t bits, int64_t group, int64_t block,
                     float damp, uint32_t* qweight, float* alpha, float* beta) {
  // Failures return NaN rather than throw: the N-API wrappers do not translate C++ exceptions (the TS driver
  // validates arguments first and turns NaN into an explanation).
  if ((bits != 2 && bits != 3 && bits != 4 && bits != 8) || group <= 0 || in % group != 0) return std::nan("");
  const int64_t n = in, L = in / group, wpr = words_per_row(in, bits);
  const int qmax = (1 << bits) - 1;
  // Blocks hold whole groups.
  const int64_t bsz = std::max<int64_t>(group, std::max<int64_t>(1, block / group) * group);

  std::vector<float> a((size_t)(n * n)), u((size_t)(n * n));
  double lambda = damp;
  bool ok = false;
  for (int attempt = 0; attempt < 6 && !ok; attempt++, lambda = lambda > 0 ? lambda * 10 : 1e-4) {
    ok = inverse_cholesky_upper(h, n, lambda, a.data(), u.data());
  }
  if (!ok) return std::nan("");  // not positive definite even with heavy dampening
  std::vector<float>().swap(a);

  std::vector<uint8_t> dead((size_t)n);
  for (int64_t i = 0; i < n; i++) dead[i] = h[i * n + i] == 0;
  std::memset(qweight, 0, sizeof(uint32_t) * (size_t)(out * wpr));

  // Per block of columns: every row quantizes the block's columns (rows are independent: parallel), then the
  // block's scaled errors update all later columns at once, W[:, i2:] −= E·U[i1:i2, i2:], as one GEMM.
  std::vector<double> row_loss((size_t)out, 0.0);
  std::vector<float> err((size_t)(out * bsz)), upd;
  const float* U = u.data();
  parallel_range(out, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++)
      for (int64_t i = 0; i < n; i++)
        if (dead[i]) w[r * n + i] = 0;
  });
  for (int64_t i1 = 0; i1 < n; i1 += bsz) {
    const int64_t i2 = std::min(n, i1 + bsz), nb = i2 - i1;
    parallel_range(out, 4, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; r++) {
        float* wr = w + r * n;
        float* er = err.data() + r * nb;
        double loss = 0;
        for (int64_t i = i1; i < i2; i++) {
          const float* ui = U + i * n;
          const int64_t k = i / group;
          if (i % group == 0) group_params(wr + i, group, qmax, alpha + r * L + k, beta + r * L + k);
          const float a_ = alpha[r * L + k], b_ = beta[r * L + k];
          const float wv = wr[i];
          float qf = std::nearbyint((wv - b_) / a_);
          qf = std::min((float)qmax, std::max(0.0f, qf));
          pack_q(qweight + r * wpr, i, bits, (uint32_t)qf);
          const float prod = a_ * qf;
          const float qhat = prod + b_;
          const float e = (wv - qhat) / ui[i];
          loss += 0.5 * (double)e * (double)e;
          wr[i] = qhat;
          er[i - i1] = e;
          for (int64_t j = i + 1; j < i2; j++) wr[j] -= e * ui[j];
        }
        row_loss[r] += loss;
      }
    });
    if (i2 < n) {
      const int64_t rest = n - i2;
      const auto ublk = take(U + i1 * n + i2, n, nb, rest);
      upd.resize((size_t)(out * rest));
      gemm(err.data(), ublk.data(), upd.data(), out, rest, nb, false, false, false);
      parallel_range(out, 4, [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; r++) {
          float* wr = w + r * n + i2;
          const float* ur = upd.data() + r * rest;
          for (int64_t j = 0; j < rest; j++) wr[j] -= ur[j];
        }
      });
    }
  }
  double total = 0;
  for (double l : row_loss) total += l;
  return total;
}

}  // namespace qalora::core
