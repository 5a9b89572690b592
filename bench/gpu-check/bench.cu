// GPU benchmark of the emitted kernels on LLaMA-7B layer shapes, run by bench/gpu-check.sh on a machine with a
// GPU. Includes the rendered kernels.cu of one spec (QL_SPEC = its specialization id) and calls its entry points
// (forward, backward: what the runtime calls through the addon) on device-resident data, with weight copies
// rotated so they come from DRAM, against two yardsticks measured in the same run: device-to-device copy
// bandwidth and a cuBLAS GEMM of the same shape (unless built with QL_NO_CUBLAS).
// Output: one line per measurement on stdout (format in bench/README.md) and a JSON file (argv[1]).
#include "cuda/kernels.cu"
#include "cuda/memory.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>
#ifndef QL_NO_CUBLAS
#include <cublas_v2.h>
#endif

#ifndef QL_SPEC
#error "define QL_SPEC as the specialization id, e.g. -DQL_SPEC=b4_g32_fp16_mean"
#endif

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

// One copy of a layer's base weights (q, α, β) on the device, filled with random values.
struct Weights {
  ql::DeviceBuffer<uint32_t> q;
  ql::DeviceBuffer<Cfg::scale> alpha, beta;
  Weights(int64_t out, int64_t wpr, int64_t L, uint64_t seed) : q(out * wpr), alpha(out * L), beta(out * L) {
    fill_u32<<<1024, 256>>>(q.ptr, q.n, seed + 1);
    fill_scales(alpha.ptr, alpha.n, seed + 2, 0.001f, 0.002f);
    fill_scales(beta.ptr, beta.n, seed + 3, 0.01f, 0.0f);
  }
  template <class S>
  static void fill_scales(S* p, size_t n, uint64_t seed, float scale, float offset) {
    if constexpr (std::is_same<S, float>::value) fill_real<float><<<1024, 256>>>(p, n, seed, scale, offset);
    else fill_real<__half><<<1024, 256>>>(reinterpret_cast<__half*>(p), n, seed, scale, offset);  // fp16 bits
  }
};

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
    // Copies of the weights, rotated call by call, together at least 4× the L2 cache: every timed call reads its
    // weights from DRAM, as a model's layers do one after the other.
    const double weight_bytes = (double)s.out * wpr * 4 + 2.0 * s.out * L * sizeof(Cfg::scale);
    const int copies = std::max(2, (int)std::ceil(4.0 * prop.l2CacheSize / weight_bytes));
    std::vector<std::unique_ptr<Weights>> w;
    for (int c = 0; c < copies; c++) w.emplace_back(new Weights(s.out, wpr, L, 10 * c));
    ql::DeviceBuffer<float> la(rank * L), lb(s.out * rank), ga(rank * L), gb(s.out * rank);
    ql::DeviceBuffer<act> x(mmax * s.in), y(mmax * s.out), dy(mmax * s.out), dx(mmax * s.in), wdense(s.out * s.in);
    fill(la.ptr, la.n, 4, 0.05f);
    fill(lb.ptr, lb.n, 5, 0.05f);
    fill(x.ptr, x.n, 6, 1.0f);
    fill(dy.ptr, dy.n, 7, 1.0f);
    fill(wdense.ptr, wdense.n, 8, 0.02f);
    CHECK(cudaDeviceSynchronize());
    // The runtime's own entry points (kernels.cu: the model calls these through the addon with device tensors).
    int turn = 0;
    auto args = [&](int64_t m, int r) {
      const Weights& c = *w[turn++ % copies];
      qalora::LayerArgs a{};
      a.qweight = c.q.ptr;
      a.alpha = c.alpha.ptr;
      a.beta = c.beta.ptr;
      a.lora_a = la.ptr;
      a.lora_b = lb.ptr;
      a.m = m, a.in = s.in, a.out = s.out, a.rank = r, a.scale = 0.25f, a.pool_scale = 1.0f / Cfg::group;
      return a;
    };
    // Decode: forward at M = 1 and M = 8, with the rank-64 adapter and merged (rank 0); bandwidth-bound, so GB/s
    // against the copy bandwidth.
    for (int merged = 0; merged < 2; merged++) {
      for (int64_t m : {(int64_t)1, (int64_t)8}) {
        const int r = merged ? 0 : rank;
        const double ms = ev.time([&] { qalora::cuda::QL_SPEC::forward(args(m, r), x.ptr, y.ptr); }, 50);
        const double bytes = weight_bytes + (merged ? 0.0 : (double)lb.n * 4) + (double)m * (s.in + s.out) * sizeof(act);
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
      const double flop = 2.0 * m * s.in * s.out;
      auto vs = [&](double tf) { return blas_tflops > 0 ? tf / blas_tflops : 0; };
      const char* of = blas_tflops > 0 ? "cublas" : "none";
      double ms = ev.time([&] { qalora::cuda::QL_SPEC::forward(args(m, rank), x.ptr, y.ptr); }, 10);
      report({"forward_gemm", s.name, m, ms, 0, flop / (ms * 1e-3) / 1e12, vs(flop / (ms * 1e-3) / 1e12), of});
      // dx alone (rank 0), the GEMM cuBLAS is compared with; then the whole backward with the adapter's dA, dB.
      ms = ev.time([&] { qalora::cuda::QL_SPEC::backward(args(m, 0), x.ptr, dy.ptr, dx.ptr, nullptr, nullptr); }, 10);
      report({"backward_dx", s.name, m, ms, 0, flop / (ms * 1e-3) / 1e12, vs(flop / (ms * 1e-3) / 1e12), of});
      ms = ev.time([&] { qalora::cuda::QL_SPEC::backward(args(m, rank), x.ptr, dy.ptr, dx.ptr, ga.ptr, gb.ptr); }, 10);
      report({"backward_lora", s.name, m, ms, 0, flop / (ms * 1e-3) / 1e12, vs(flop / (ms * 1e-3) / 1e12), of});
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
