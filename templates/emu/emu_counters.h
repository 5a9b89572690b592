// What the emulated CUDA runtime did since the last reset: the traffic and the host stalls a GPU run would pay
// for, which the emulator's results alone cannot show (a kernel that is right but re-uploads its weights per
// call looks the same as one that keeps them resident). Plain integers and no CUDA header, so the addon's
// glue (addon.cpp.njk) can include it; the field list there comes from compiler/emu-counters.ts.
#pragma once
#include <cstdint>

namespace qlemu {

struct Counters {
  uint64_t h2d_calls, h2d_bytes;  // cudaMemcpy(Async) host → device (by where the pointers are, not the kind)
  uint64_t d2h_calls, d2h_bytes;  // device → host
  uint64_t d2d_calls, d2d_bytes;  // device → device
  uint64_t allocs, alloc_bytes;   // cudaMalloc
  uint64_t frees;                 // cudaFree of a live allocation
  // cudaDeviceSynchronize / cudaStreamSynchronize / cudaEventSynchronize, and every blocking cudaMemcpy to or
  // from host memory: on a GPU the host waits for the stream there too.
  uint64_t syncs;
  uint64_t launches;  // kernel launches that passed the configuration checks
};

Counters counters();
void reset_counters();

}  // namespace qlemu
