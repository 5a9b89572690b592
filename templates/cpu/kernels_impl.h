// Everything one instruction-set build of the CPU kernels needs. Each translation unit that includes it first
// defines QL_ISA_NS (portable or avx2), so the two builds live in different namespaces and can never
// exchange an inline function compiled for the wrong CPU.
#pragma once
#ifndef QL_ISA_NS
#error "define QL_ISA_NS (portable or avx2) before including kernels_impl.h"
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "qalora_common.h"
#include "threadpool.h"
#include "vec8.h"
#include "gemm.h"
#include "pack.h"
#include "gemv_int8.h"
#include "gemv_q4.h"
#include "layer.h"

/// The ABI entry points of one specialization in this build: qalora::cpu_isa::<isa>::<ID>::{quantize, …}.
/// Only BITS, whether GROUP is a multiple of 32 and the scale storage SCALE (float or uint16_t) select code;
/// the rest are constants passed down.
#define QL_CPU_DEFINE_SPEC(ID, BITS, GROUP, DTYPE, POOL, SCALE, MC, NC, KC, GEMV_MAX_ROWS)                       \
  namespace qalora::cpu_isa::QL_ISA_NS::ID {                                                                    \
  using Scale = SCALE;                                                                                          \
  using Impl = QuantLayer<BITS, (GROUP) % 32 == 0, Scale>;                                                      \
  constexpr SpecConsts kSpec{GROUP, DType::DTYPE, Pool::POOL, Blocking{MC, NC, KC}, GEMV_MAX_ROWS};             \
  void quantize(const float* w, int64_t out, int64_t in, uint32_t* qweight, void* alpha, void* beta) {         \
    Impl::quantize(kSpec, w, out, in, qweight, static_cast<Scale*>(alpha), static_cast<Scale*>(beta));          \
  }                                                                                                             \
  void dequantize(const uint32_t* qweight, const void* alpha, const void* beta, int64_t out, int64_t in,       \
                  float* w) {                                                                                   \
    Impl::dequantize(kSpec, qweight, static_cast<const Scale*>(alpha), static_cast<const Scale*>(beta), out,    \
                     in, w);                                                                                    \
  }                                                                                                             \
  void forward(const LayerArgs& a, const void* x, void* y) { Impl::forward(kSpec, a, x, y); }                  \
  void backward(const LayerArgs& a, const void* x, const void* dy, void* dx, float* grad_a, float* grad_b) {   \
    Impl::backward(kSpec, a, x, dy, dx, grad_a, grad_b);                                                        \
  }                                                                                                             \
  void merge(const LayerArgs& a, void* beta_out) { QL_ISA_NS::merge(kSpec, a, static_cast<Scale*>(beta_out)); } \
  }

/// Fixed float operations of this build (see float_gemm.h).
#define QL_CPU_DEFINE_FLOAT_OPS()                                                                               \
  namespace qalora::cpu_isa::QL_ISA_NS {                                                                        \
  void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,     \
                int64_t b_rs, int64_t b_cs, float* c, int64_t ldc, bool accumulate) {                           \
    gemm_strided(m, n, k, {a, a_rs, a_cs}, Strided{b, b_rs, b_cs}, c, ldc, accumulate);                         \
  }                                                                                                             \
  void gemm_half(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const uint16_t* b, \
                 int64_t b_rs, int64_t b_cs, bool bf16, float* c, int64_t ldc, bool accumulate) {               \
    if (bf16)                                                                                                   \
      gemm_strided(m, n, k, {a, a_rs, a_cs}, StridedOf<bf16_t>{reinterpret_cast<const bf16_t*>(b), b_rs, b_cs}, \
                   c, ldc, accumulate);                                                                         \
    else                                                                                                        \
      gemm_strided(m, n, k, {a, a_rs, a_cs}, StridedOf<f16_t>{reinterpret_cast<const f16_t*>(b), b_rs, b_cs},   \
                   c, ldc, accumulate);                                                                         \
  }                                                                                                             \
  }
