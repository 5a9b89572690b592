// GPU benchmark of the emitted kernels on LLaMA-7B layer shapes, run by bench/gpu-check.sh on a machine with a
// GPU. Includes the rendered kernels.cu of one spec (QL_SPEC = its specialization id) and launches the kernels on
// device-resident data (no host staging), against two yardsticks measured in the same run: device-to-device copy
// bandwidth and a cuBLAS GEMM of the same shape (unless built with QL_NO_CUBLAS).
// Output: one line per measurement on stdout (format in bench/README.md) and a JSON file (argv[1]).
#include "cuda/kernels.cu"

#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>
#ifndef QL_NO_CUBLAS
#include <cublas_v2.h>
#endif

#ifndef QL_SPEC
#error "define QL_SPEC as the specialization id, e.g. -DQL_SPEC=b4_g32_fp16_mean"
#endif

namespace kern = qalora::cuda::kern;
namespace host = qalora::cuda::host;
using Cfg = qalora::cuda::QL_SPEC::Config;
using act = Cfg::act;

#define CHECK(x) ql::check((x), #x)
#define QL_STR2(x) #x
#define QL_STR(x) QL_STR2(x)

__global__ void fill_u32(uint32_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = (uint32_t)qalora::splitmix64(seed ^ i);
}
template <class T>
__global__ void fill_real(T* p, size_t n, uint64_t seed, float scale, float offset) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float u = (float)(qalora::splitmix64(seed ^ i) >> 40) * (1.0f / 16777216.0f);
    p[i] = ql::Act<T>::from_f(offset + scale * (2.0f * u - 1.0f));
  }
}

struct Events {
  cudaEvent_t start, stop;
  Events() { CHECK(cudaEventCreate(&start)); CHECK(cudaEventCreate(&stop)); }
  ~Events() { cudaEventDestroy(start); cudaEventDestroy(stop); }
  // Mean milliseconds per call after a warm-up call.
  template <class F>
  double time(F f, int reps) {
    f();
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(start));
    for (int i = 0; i < reps; i++) f();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaGetLastError());
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms / reps;
  }
};

struct Result {
  std::string op, shape;
  int64_t m;
  double ms, gbps, tflops, vs;  // vs: fraction of the yardstick (copy bandwidth or cuBLAS)
  std::string yardstick;
};
static std::vector<Result> results;

static void report(const Result& r) {
  results.push_back(r);
  printf("RESULT op=%s shape=%s m=%lld ms=%.4f GB/s=%.1f TFLOP/s=%.2f vs=%.3f of=%s\n", r.op.c_str(), r.shape.c_str(),
         (long long)r.m, r.ms, r.gbps, r.tflops, r.vs, r.yardstick.c_str());
  fflush(stdout);
}

template <class T>
static void fill(T* p, size_t n, uint64_t seed, float scale, float offset = 0.0f) {
  fill_real<T><<<1024, 256>>>(p, n, seed, scale, offset);
  CHECK(cudaGetLastError());
}

int main(int argc, char** argv) {
  const char* json = argc > 1 ? argv[1] : "bench.json";
  const std::string status = qalora::cuda::status();
  printf("STATUS %s\n", status.c_str());
  if (status.rfind("ok", 0) != 0) {
    printf("SKIP no usable GPU: the benchmark needs one\n");
    return 2;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("DEVICE name=\"%s\" sm=%d%d sms=%d mem_gb=%.1f spec=%s bits=%d group=%d\n", prop.name, prop.major, prop.minor,
         prop.multiProcessorCount, prop.totalGlobalMem / 1e9, QL_STR(QL_SPEC), Cfg::bits, Cfg::group);
  Events ev;

  // Yardstick 1: device-to-device copy (reads + writes).
  double copy_gbps = 0;
  {
    const size_t bytes = (size_t)1 << 30;
    ql::DeviceBuffer<uint8_t> a(bytes), b(bytes);
    CHECK(cudaMemset(a.ptr, 1, bytes));
    const double ms = ev.time([&] { CHECK(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice)); }, 20);
    copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
    report({"copy", "1GiB", 0, ms, copy_gbps, 0, 1.0, "copy"});
  }
#ifndef QL_NO_CUBLAS
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) { printf("ERROR cublasCreate failed\n"); return 1; }
  const cudaDataType_t blas_type = std::is_same<act, __half>::value ? CUDA_R_16F : std::is_same<act, float>::value ? CUDA_R_32F : CUDA_R_16BF;
#endif

  struct Shape { const char* name; int64_t in, out; };
  const Shape shapes[] = {{"4096x4096", 4096, 4096}, {"4096x11008", 4096, 11008}, {"11008x4096", 11008, 4096}};
  const int rank = 64;
  const int64_t gemm_rows[] = {512, 4096};
  for (const Shape& s : shapes) {
    const int64_t L = s.in / Cfg::group, wpr = qalora::words_per_row(s.in, Cfg::bits), mmax = 4096;
    ql::DeviceBuffer<uint32_t> qw(s.out * wpr);
    ql::DeviceBuffer<float> alpha(s.out * L), beta(s.out * L), la(rank * L), lb(s.out * rank);
    ql::DeviceBuffer<act> x(mmax * s.in), y(mmax * s.out), dy(mmax * s.out), dx(mmax * s.in), wdense(s.out * s.in);
    ql::DeviceBuffer<float> pooled(mmax * L), h(mmax * rank), dpx(mmax * L);
    fill_u32<<<1024, 256>>>(qw.ptr, qw.n, 1);
    fill(alpha.ptr, alpha.n, 2, 0.001f, 0.002f);
    fill(beta.ptr, beta.n, 3, 0.01f);
    fill(la.ptr, la.n, 4, 0.05f);
    fill(lb.ptr, lb.n, 5, 0.05f);
    fill(x.ptr, x.n, 6, 1.0f);
    fill(dy.ptr, dy.n, 7, 1.0f);
    fill(wdense.ptr, wdense.n, 8, 0.02f);
    CHECK(cudaDeviceSynchronize());
    const kern::DropoutArgs nodrop{0.0f, 1.0f, 0, 0};
    const double weight_bytes = (double)qw.n * 4 + 2.0 * alpha.n * 4 + (double)lb.n * 4;

    auto pool = [&](int64_t m) {
      kern::PoolParams<act> pp{x.ptr, la.ptr, pooled.ptr, h.ptr, m, s.in, rank, 1.0f / Cfg::group, nodrop};
      kern::pool_kernel<Cfg><<<(unsigned)m, host::kAuxThreads>>>(pp);
    };
    // Decode: the whole forward at M = 1 and M = 8, with the rank-64 adapter (pool + GEMV) and merged (rank 0:
    // the GEMV alone); bandwidth-bound, so GB/s against the copy bandwidth.
    for (int merged = 0; merged < 2; merged++) {
      for (int64_t m : {(int64_t)1, (int64_t)8}) {
        const int r = merged ? 0 : rank;
        kern::GemvParams<act> gp{x.ptr, qw.ptr, alpha.ptr, beta.ptr, lb.ptr, h.ptr, y.ptr, m, s.in, s.out, r, 0.25f};
        const double ms = ev.time([&] {
          if (!merged) pool(m);
          if (m == 1) host::launch_gemv<Cfg, 1>(gp);
          else host::launch_gemv<Cfg, host::kGemvRows>(gp);
        }, 50);
        const double bytes = weight_bytes - (merged ? (double)lb.n * 4 : 0.0) + (double)m * (s.in + s.out) * sizeof(act);
        report({merged ? "forward_gemv_merged" : "forward_gemv", s.name, m, ms, bytes / (ms * 1e-3) / 1e9,
                2.0 * m * s.in * s.out / (ms * 1e-3) / 1e12, bytes / (ms * 1e-3) / 1e9 / copy_gbps, "copy"});
      }
    }
    for (int64_t m : gemm_rows) {
      double blas_tflops = 0;
#ifndef QL_NO_CUBLAS
      {
        const float one = 1.0f, zero = 0.0f;
        const double ms = ev.time([&] {
          if (cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)s.out, (int)m, (int)s.in, &one, wdense.ptr, blas_type, (int)s.in,
                           x.ptr, blas_type, (int)s.in, &zero, y.ptr, blas_type, (int)s.out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
            printf("ERROR cublasGemmEx failed\n");
        }, 10);
        blas_tflops = 2.0 * m * s.in * s.out / (ms * 1e-3) / 1e12;
        report({"cublas_gemm", s.name, m, ms, 0, blas_tflops, 1.0, "cublas"});
      }
#endif
      kern::GemmParams<act> fp{x.ptr, qw.ptr, alpha.ptr, beta.ptr, lb.ptr, h.ptr, nullptr, y.ptr, m, s.in, s.out, rank, 0.25f, nodrop};
      double ms = ev.time([&] { pool(m); host::launch_gemm<Cfg, false>(fp); }, 10);
      double tf = 2.0 * m * s.in * s.out / (ms * 1e-3) / 1e12;
      report({"forward_gemm", s.name, m, ms, 0, tf, blas_tflops > 0 ? tf / blas_tflops : 0, blas_tflops > 0 ? "cublas" : "none"});
      kern::GemmParams<act> bp{dy.ptr, qw.ptr, alpha.ptr, beta.ptr, nullptr, nullptr, dpx.ptr, dx.ptr, m, s.in, s.out, rank, 0.25f, nodrop};
      ms = ev.time([&] { host::launch_gemm<Cfg, true>(bp); }, 10);
      tf = 2.0 * m * s.in * s.out / (ms * 1e-3) / 1e12;
      report({"backward_dx", s.name, m, ms, 0, tf, blas_tflops > 0 ? tf / blas_tflops : 0, blas_tflops > 0 ? "cublas" : "none"});
    }
  }
  FILE* f = fopen(json, "w");
  if (f) {
    fprintf(f, "{\n  \"device\": \"%s\",\n  \"sm\": \"%d%d\",\n  \"copyGBs\": %.1f,\n  \"results\": [\n", prop.name, prop.major, prop.minor, copy_gbps);
    for (size_t i = 0; i < results.size(); i++) {
      const Result& r = results[i];
      fprintf(f, "    {\"op\": \"%s\", \"shape\": \"%s\", \"m\": %lld, \"ms\": %.5f, \"GBs\": %.2f, \"TFLOPs\": %.3f, \"vs\": %.4f, \"of\": \"%s\"}%s\n",
              r.op.c_str(), r.shape.c_str(), (long long)r.m, r.ms, r.gbps, r.tflops, r.vs, r.yardstick.c_str(), i + 1 < results.size() ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    fclose(f);
  }
  return 0;
}
