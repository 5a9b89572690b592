// Picks the AVX2/FMA/F16C build of the CPU kernels when this CPU has it, the portable build otherwise.
// QALORA_CPU_ISA=portable forces the portable build (read on every call, so tests can compare the two).
#pragma once
#include <cstdlib>
#include <cstring>

#include "qalora_common.h"

#if defined(__x86_64__) || defined(__i386__)
#define QL_HAVE_AVX2_BUILD 1
#else
#define QL_HAVE_AVX2_BUILD 0
#endif

namespace qalora::cpu_isa {

inline bool use_avx2() {
#if QL_HAVE_AVX2_BUILD
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c");
  const char* forced = std::getenv("QALORA_CPU_ISA");
  return cpu_has && !(forced && std::strcmp(forced, "portable") == 0);
#else
  return false;
#endif
}

}  // namespace qalora::cpu_isa

#if QL_HAVE_AVX2_BUILD
#define QL_CPU_CALL(ID, FN, ...)                                                         \
  (qalora::cpu_isa::use_avx2() ? qalora::cpu_isa::avx2::ID::FN(__VA_ARGS__)              \
                               : qalora::cpu_isa::portable::ID::FN(__VA_ARGS__))
#else
#define QL_CPU_CALL(ID, FN, ...) qalora::cpu_isa::portable::ID::FN(__VA_ARGS__)
#endif

/// The ABI declarations of one specialization, for every build.
#define QL_CPU_DECLARE_SPEC_IN(NS, ID) QL_DECLARE_LAYER_KERNELS(NS::ID)

/// The public entry points qalora::cpu::<ID>::{quantize, …} of docs/ARCHITECTURE.md.
#define QL_CPU_PUBLIC_SPEC(ID)                                                                                    \
  QL_CPU_DECLARE_SPEC_IN(qalora::cpu_isa::avx2, ID)                                                               \
  namespace qalora::cpu::ID {                                                                                     \
  void quantize(const float* w, int64_t out, int64_t in, uint32_t* qweight, void* alpha, void* beta) {           \
    QL_CPU_CALL(ID, quantize, w, out, in, qweight, alpha, beta);                                                  \
  }                                                                                                               \
  void dequantize(const uint32_t* qweight, const void* alpha, const void* beta, int64_t out, int64_t in,         \
                  float* w) {                                                                                     \
    QL_CPU_CALL(ID, dequantize, qweight, alpha, beta, out, in, w);                                                \
  }                                                                                                               \
  void forward(const LayerArgs& a, const void* x, void* y) { QL_CPU_CALL(ID, forward, a, x, y); }                \
  void backward(const LayerArgs& a, const void* x, const void* dy, void* dx, float* grad_a, float* grad_b) {     \
    QL_CPU_CALL(ID, backward, a, x, dy, dx, grad_a, grad_b);                                                      \
  }                                                                                                               \
  void merge(const LayerArgs& a, void* beta_out) { QL_CPU_CALL(ID, merge, a, beta_out); }                         \
  }
