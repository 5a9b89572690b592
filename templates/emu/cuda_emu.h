// CUDA on the CPU, for functional tests of the very same kernel source nvcc compiles (notes §3).
// Include this, then the .cu file, and compile with g++ -DQALORA_EMU -I<cuda>/include:
//   - every CUDA thread is a fiber with its own stack; a block's fibers run on one worker thread and
//     blocks are spread over a pool of workers (QALORA_EMU_THREADS, default: all cores);
//   - __syncthreads releases when all live threads of the block arrive, warp collectives when all lanes of
//     the mask arrive; a kernel where neither can happen aborts with every thread's state;
//   - QALORA_EMU_SEED=<n> (non-zero) shuffles the order in which runnable threads are scheduled;
//   - device memory is malloc'd (and dynamic shared memory per block), so -fsanitize=address reports
//     out-of-bounds accesses with the kernel's source line (static __shared__ arrays are thread_locals,
//     which ASan does not bound); both start filled with 0xff bytes (NaN / -1), never a lucky zero;
//   - cudaFree poisons the block (bytes ff 7f: NaN as fp32, fp16 and bf16) and keeps it out of malloc's hands
//     for a while (under ASan marked unaddressable: use-after-poison), so a use after free is not silently right;
//   - every copy is classified by where its pointers are (a kind that disagrees, or a copy past the end of a
//     block, is refused with a message) and counted with allocations, frees, synchronizations and launches
//     (emu_counters.h; addon.emuCounters());
//   - built with -fsanitize=alignment (the addon and the tests do), every load and store through a cast —
//     *reinterpret_cast<const uint4*>(p) — is checked against its type's alignment, as a GPU faults on it;
//   - cp.async copies land at the cp.async.wait_group that covers them, so a missing wait reads stale data;
//   - launches are synchronous; bad configurations set cudaGetLastError() like CUDA; texture/surface objects,
//     cooperative groups, __activemask, __managed__, inline asm and device-side launches are refused by name.
// Runtime sources: emu_sched.cpp (scheduler, barriers, launch), emu_warp.cpp (warp collectives, mma/ldmatrix),
// emu_ptx.cpp (PTX twins), emu_fiber.cpp (context switch), emu_api.cpp (runtime API).
#pragma once
#ifndef QALORA_EMU
#define QALORA_EMU 1
#endif

// Standard headers first: the refusal of `asm` at the end must not reach them.
#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The real fp16/bf16 headers compile under g++ and round exactly like F16C. Their crt/host_defines.h
// defines the CUDA keywords for host code; they are redefined below for emulated device code.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include "emu_api.h"
#include "emu_core.h"
#include "emu_intrinsics.h"

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
// Static shared memory: one instance per worker thread, and a worker runs one block at a time.
#define __shared__ static thread_local
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

// Built-in variables read the running fiber's state (fibers share their OS thread's thread_locals).
#define threadIdx (static_cast<const uint3&>(qlemu_current->threadIdx))
#define blockIdx (static_cast<const uint3&>(qlemu_current->blockIdx))
#define blockDim (static_cast<const dim3&>(qlemu_current->blockDim))
#define gridDim (static_cast<const dim3&>(qlemu_current->gridDim))
constexpr int warpSize = 32;

// The generator's portability macros (their nvcc definitions are in templates/cuda/runtime.cuh).
#define QL_BACKEND_NS emu
#define QL_BACKEND_NAME "emu"
#define QL_LAUNCH(kernel, grid, block, smem_bytes, stream) \
  ::qlemu::make_launcher(kernel, grid, block, smem_bytes, stream, #kernel, __FILE__, __LINE__)
#define QL_DYN_SMEM(type, name) type* const name = static_cast<type*>(::qlemu::dynamic_smem())
#define QL_UNROLL

// The runtime API subset (emu_api.h): every call of these names goes to the emulator.
#define cudaDeviceGetAttribute ::qlemu::api::cudaDeviceGetAttribute
#define cudaDeviceSynchronize ::qlemu::api::cudaDeviceSynchronize
#define cudaEventCreate ::qlemu::api::cudaEventCreate
#define cudaEventDestroy ::qlemu::api::cudaEventDestroy
#define cudaEventElapsedTime ::qlemu::api::cudaEventElapsedTime
#define cudaEventRecord ::qlemu::api::cudaEventRecord
#define cudaEventSynchronize ::qlemu::api::cudaEventSynchronize
#define cudaFree ::qlemu::api::cudaFree
#define cudaFreeHost ::qlemu::api::cudaFreeHost
#define cudaFuncSetAttribute ::qlemu::api::cudaFuncSetAttribute
#define cudaGetDevice ::qlemu::api::cudaGetDevice
#define cudaGetDeviceCount ::qlemu::api::cudaGetDeviceCount
#define cudaGetDeviceProperties ::qlemu::api::cudaGetDeviceProperties
#define cudaGetErrorName ::qlemu::api::cudaGetErrorName
#define cudaGetErrorString ::qlemu::api::cudaGetErrorString
#define cudaGetLastError ::qlemu::api::cudaGetLastError
#define cudaMalloc ::qlemu::api::cudaMalloc
#define cudaMallocHost ::qlemu::api::cudaMallocHost
#define cudaMemcpy ::qlemu::api::cudaMemcpy
#define cudaMemcpyAsync ::qlemu::api::cudaMemcpyAsync
#define cudaMemGetInfo ::qlemu::api::cudaMemGetInfo
#define cudaMemset ::qlemu::api::cudaMemset
#define cudaMemsetAsync ::qlemu::api::cudaMemsetAsync
#define cudaPeekAtLastError ::qlemu::api::cudaPeekAtLastError
#define cudaSetDevice ::qlemu::api::cudaSetDevice
#define cudaStreamCreate ::qlemu::api::cudaStreamCreate
#define cudaStreamCreateWithFlags ::qlemu::api::cudaStreamCreateWithFlags
#define cudaStreamDestroy ::qlemu::api::cudaStreamDestroy
#define cudaStreamSynchronize ::qlemu::api::cudaStreamSynchronize

#include "emu_refuse.h"
