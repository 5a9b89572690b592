// The device memory every GPU entry point and every backend-owned tensor allocates from: a caching allocator
// in stream order. All work runs on one stream (the legacy default), so a block handed back after its last
// launch was queued can be handed out again at once: any kernel that uses it next is queued later on the same
// stream. In the steady state of decode or training every request is served from the free lists, with no
// cudaMalloc or cudaFree (the emulator's counters prove it). Sizes are rounded to classes so a step's
// temporaries find the blocks the previous step released.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <vector>

#include "device_memory.h"

namespace ql {
inline namespace QL_BACKEND_NS {

class DevicePool {
 public:
  // Below 1 MiB: powers of two from 256 B (small temporaries vary in size from call to call); above: multiples
  // of 2 MiB, so a large weight wastes at most 2 MiB instead of up to half its size. On the emulator every block
  // has its exact size, so its bounds checks (and AddressSanitizer's) stay exact.
  static size_t size_class(size_t bytes) {
#ifdef QALORA_EMU
    return bytes;
#else
    constexpr size_t kLarge = (size_t)2 << 20;
    if (bytes >= ((size_t)1 << 20)) return (bytes + kLarge - 1) / kLarge * kLarge;
    size_t s = 256;
    while (s < bytes) s <<= 1;
    return s;
#endif
  }

  void* get(size_t bytes) {
    if (bytes == 0) return nullptr;
    const size_t n = size_class(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        stats_.cached_bytes -= n;
        took(n);
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, n);
    if (e == cudaErrorMemoryAllocation) {  // what the free lists hold may be what is missing
      (void)cudaGetLastError();
      trim();
      e = cudaMalloc(&p, n);
    }
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("qalora CUDA: cudaMalloc of ") + std::to_string(n) + " bytes: " + cudaGetErrorString(e));
    std::lock_guard<std::mutex> lock(mu_);
    stats_.device_allocs++;
    took(n);
    return p;
  }

  void put(void* p, size_t bytes) {
    if (!p) return;
    const size_t n = size_class(bytes);
#ifdef QALORA_EMU
    // What a reader of a released block sees on the emulator: NaN, as after cudaFree (templates/emu).
    qlemu::api::poison(p, n);
#endif
    std::lock_guard<std::mutex> lock(mu_);
    free_[n].push_back(p);
    stats_.cached_bytes += n;
    stats_.live_bytes -= n;
  }

  // Gives every cached block back to the driver (cudaFree): after a model is dropped, or before retrying an
  // allocation that failed.
  void trim() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [n, blocks] : free_)
      for (void* p : blocks) cudaFree(p);
    free_.clear();
    stats_.cached_bytes = 0;
  }

  qalora::PoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  void took(size_t n) {
    stats_.live_bytes += n;
    if (stats_.live_bytes > stats_.peak_bytes) stats_.peak_bytes = stats_.live_bytes;
  }
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  qalora::PoolStats stats_{};
};

// One pool per backend and per addon, defined in memory.cu. Not an inline function's static: g++ makes those
// STB_GNU_UNIQUE, and the dynamic linker would then hand every loaded addon the first one's pool, whose blocks
// another addon's (emulated) runtime does not know.
DevicePool& pool();

}  // namespace QL_BACKEND_NS
}  // namespace ql
