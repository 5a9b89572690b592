// What the addon needs from a GPU backend's memory (templates/cuda/memory.cu), in plain C++ so the N-API glue,
// compiled without nvcc, can hold backend-owned tensors and stage host arrays through the same pool the kernels
// use. One table per compiled GPU backend (cuda, emu).
#pragma once
#include <cstddef>
#include <cstdint>

namespace qalora {

struct PoolStats {
  uint64_t live_bytes;     // handed out and not yet given back
  uint64_t cached_bytes;   // given back, kept for reuse
  uint64_t peak_bytes;     // most live at once
  uint64_t device_allocs;  // cudaMalloc calls the pool made
};

struct DeviceMemory {
  const char* backend;
  void* (*alloc)(size_t bytes);                             // from the pool; nullptr for 0 bytes
  void (*release)(void* p, size_t bytes);                   // back to the pool, in stream order
  void (*upload)(void* dst, const void* src, size_t bytes);    // host → device, queued (the host array may be reused at once)
  void (*download)(void* dst, const void* src, size_t bytes);  // device → host: waits for the stream
  void (*copy)(void* dst, const void* src, size_t bytes);      // device → device, queued
  void (*sync)();                                           // waits for the stream; throws what a kernel raised
  void (*trim)();                                           // cached blocks back to the driver
  PoolStats (*stats)();
};

}  // namespace qalora
