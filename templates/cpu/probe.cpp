// Fixed CPU ops (declared in probe.ops.json): the memory-read bandwidth probe the benchmark compares kernels
// against, the pool's thread count, and the GEMM entry points of float_gemm.h with their dispatch.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "dispatch.h"
#include "float_gemm.h"
#include "threadpool.h"

namespace qalora::cpu_isa {
namespace avx2 {
void gemm_f32(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
              int64_t, bool);
void gemm_half(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, bool,
               float*, int64_t, bool);
}
namespace portable {
void gemm_f32(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
              int64_t, bool);
void gemm_half(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, bool,
               float*, int64_t, bool);
}
}  // namespace qalora::cpu_isa

namespace qalora::cpu {

void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t b_rs, int64_t b_cs, float* c, int64_t ldc, bool accumulate) {
#if QL_HAVE_AVX2_BUILD
  if (cpu_isa::use_avx2()) return cpu_isa::avx2::gemm_f32(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
#endif
  cpu_isa::portable::gemm_f32(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
}

void gemm_half(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const uint16_t* b,
               int64_t b_rs, int64_t b_cs, bool bf16, float* c, int64_t ldc, bool accumulate) {
#if QL_HAVE_AVX2_BUILD
  if (cpu_isa::use_avx2())
    return cpu_isa::avx2::gemm_half(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, bf16, c, ldc, accumulate);
#endif
  cpu_isa::portable::gemm_half(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, bf16, c, ldc, accumulate);
}

/// c[m,n] = a[m,k]·b[n,k]ᵀ: a linear layer's y = x·Wᵀ in fp32.
void matmul_nt(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k) {
  gemm_f32(m, n, k, a, k, 1, b, 1, k, c, n, false);
}

double thread_count() { return cpu_rt::thread_count(); }

/// Best read bandwidth in GB/s over `reps` passes of all pool threads over a `bytes` buffer (far larger than
/// the caches, so it measures memory). Every thread reads its own slice, as the kernels' tasks do.
double read_bandwidth(int64_t bytes, int32_t reps) {
  const int64_t words = std::max<int64_t>(1 << 20, bytes / 8);
  std::unique_ptr<uint64_t[]> buf(new uint64_t[words]);
  cpu_rt::parallel_range(words, 1 << 16, [&](int64_t b, int64_t e) {  // first touch from the readers
    for (int64_t i = b; i < e; i++) buf[i] = (uint64_t)i * 0x9E3779B97F4A7C15ull;
  });
  const int threads = cpu_rt::thread_count();
  std::vector<uint64_t> sink(threads * 8);
  double best = 0;
  for (int r = 0; r < std::max(1, reps); r++) {
    const auto t0 = std::chrono::steady_clock::now();
    cpu_rt::parallel_for(threads, [&](int64_t t) {
      const int64_t step = (words + threads - 1) / threads, b = t * step, e = std::min(words, b + step);
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = b;
      for (; i + 4 <= e; i += 4) {
        s0 ^= buf[i];
        s1 ^= buf[i + 1];
        s2 ^= buf[i + 2];
        s3 ^= buf[i + 3];
      }
      for (; i < e; i++) s0 ^= buf[i];
      sink[t * 8] = s0 ^ s1 ^ s2 ^ s3;
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, (double)words * 8 / s / 1e9);
  }
  volatile uint64_t keep = 0;
  for (uint64_t v : sink) keep = keep ^ v;
  (void)keep;
  return best;
}

}  // namespace qalora::cpu
