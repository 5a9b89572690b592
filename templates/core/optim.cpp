// The optimizer's element-wise update and the gradient norm as native ops, so a model whose adapters live on a
// GPU updates them there (templates/cuda/core.cu has the twins). Built without -mfma (not an _avx2 file): no
// multiply-add is contracted, so the update is the host AdamW's (runtime/train/adamw.ts) bit for bit.
#include <cmath>
#include <cstdint>

namespace qalora::core {

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                  double eps, double decay, double grad_scale, double bc1, double bc2) {
  for (int64_t i = 0; i < n; i++) {
    const double gi = (double)g[i] * grad_scale;
    const double mi = beta1 * m[i] + (1 - beta1) * gi;
    const double vi = beta2 * v[i] + (1 - beta2) * gi * gi;
    m[i] = (float)mi;
    v[i] = (float)vi;
    p[i] = (float)(p[i] * decay - (lr * (mi / bc1)) / (std::sqrt(vi / bc2) + eps));
  }
}

double sum_squares(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
  return s;
}

}  // namespace qalora::core
