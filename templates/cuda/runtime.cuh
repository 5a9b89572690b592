// Host-side plumbing shared by every CUDA specialization: the launch/shared-memory macros (nvcc side; the
// emulator's cuda_emu.h defines its own), pooled device temporaries (pool.cuh), error checks, and the
// activation-type traits the kernels are written against.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#ifndef QALORA_EMU
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define QL_BACKEND_NS cuda
#define QL_BACKEND_NAME "cuda"
#define QL_LAUNCH(kernel, grid, block, smem_bytes, stream) kernel<<<(grid), (block), (smem_bytes), (stream)>>>
#define QL_DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define QL_UNROLL _Pragma("unroll")
#define QL_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
// Keeps a loop rolled where unrolling would only hoist addresses into registers the accumulators need.
#define QL_NO_UNROLL _Pragma("unroll 1")
#else
#define QL_NO_UNROLL
// The emulator runs one fiber per thread; register limits mean nothing there.
#define QL_LAUNCH_BOUNDS(threads, min_blocks)
#endif

#define QL_DEV __device__ __forceinline__

#include "pool.cuh"

// One inline namespace per backend: the nvcc build and the emulator build of these inline helpers link into
// one addon, and without it the linker would keep one copy of, say, ql::DeviceBuffer<float> for both.
namespace ql {
inline namespace QL_BACKEND_NS {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("qalora CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// A temporary on the device for the length of one entry point: from the pool, back to it in stream order.
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : ptr(static_cast<T*>(pool().get(count * sizeof(T)))), n(count) {}
  ~DeviceBuffer() { pool().put(ptr, n * sizeof(T)); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Device → device, queued on the stream.
inline void copy_device(void* dst, const void* src, size_t bytes) {
  if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync device to device");
}

inline void launched(const char* kernel) {
  check(cudaGetLastError(), kernel);
}

template <class T>
QL_DEV T bit_cast_dev(uint32_t u) {
  T v;
  memcpy(&v, &u, 4);
  return v;
}

// ---- Activation types ------------------------------------------------------------------------------------
// `op` is the tensor-core operand type of the tiled engine (float means: no tensor cores, SIMT path).
template <class T>
struct Act;
template <>
struct Act<float> {
  using op = float;
  static constexpr bool tensor_cores = false;
  QL_DEV static float to_f(float v) { return v; }
  QL_DEV static float from_f(float v) { return v; }
};
template <>
struct Act<__half> {
  using op = __half;
  static constexpr bool tensor_cores = true;
  QL_DEV static float to_f(__half v) { return __half2float(v); }
  QL_DEV static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Act<__nv_bfloat16> {
  using op = __nv_bfloat16;
  static constexpr bool tensor_cores = true;
  QL_DEV static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  QL_DEV static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <class T>
QL_DEV T tmin(T a, T b) {
  return a < b ? a : b;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

}  // namespace QL_BACKEND_NS
}  // namespace ql
