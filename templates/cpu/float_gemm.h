// The CPU backend's fp32 GEMM (the engine of gemm.h, AVX2 or portable picked at run time) for code outside
// the QA-LoRA kernels, e.g. the core `gemm` op (templates/core/gemm.cpp): C[m,n] (+)= A·B with
// A(i,k) = a[i*a_rs + k*a_cs] and B(k,j) = b[k*b_rs + j*b_cs] (so Bᵀ of a row-major [n,k] weight is
// b_rs = 1, b_cs = k).
#pragma once
#include <cstdint>

namespace qalora::cpu {
void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t b_rs, int64_t b_cs, float* c, int64_t ldc, bool accumulate);
/// The same with B stored as fp16 (bf16 when `bf16`) bits, widened as the engine packs or streams it: a token
/// table kept in its file's half type.
void gemm_half(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const uint16_t* b,
               int64_t b_rs, int64_t b_cs, bool bf16, float* c, int64_t ldc, bool accumulate);
}
