// The core float GEMM is the CPU backend's one GEMM engine (cpu/gemm.h through float_gemm.h, AVX2 or portable
// picked at run time); this file only maps the descriptor's transpose flags onto its strided views.
#include "core_ops.h"
#include "cpu/float_gemm.h"

namespace qalora::core {

void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b,
          bool accumulate) {
  // A(i,p) = a[i*k + p], or a[p*m + i] when transposed; B(p,j) = b[p*n + j], or b[j*k + p].
  cpu::gemm_f32(m, n, k, a, trans_a ? 1 : k, trans_a ? m : 1, b, trans_b ? 1 : n, trans_b ? k : 1, c, n,
                accumulate);
}

void gemm_half(const float* a, const uint16_t* b, float* c, int64_t m, int64_t n, int64_t k, bool trans_b, bool bf16,
               bool accumulate) {
  cpu::gemm_half(m, n, k, a, k, 1, b, trans_b ? 1 : n, trans_b ? k : 1, bf16, c, n, accumulate);
}

}  // namespace qalora::core
