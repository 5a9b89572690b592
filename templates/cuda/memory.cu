// The backend's memory as the addon sees it (templates/common/device_memory.h): backend-owned tensors and the
// staging of host arrays go through the same pool as the kernels' temporaries. Uploads and device copies are
// queued on the stream; only a download (or sync) makes the host wait, so a decode step waits once, when its
// logits come back.
#include "runtime.cuh"
#include "device_memory.h"

namespace ql {
inline namespace QL_BACKEND_NS {
// Never destroyed: cudart may be torn down before static destructors run.
DevicePool& pool() {
  static DevicePool* p = new DevicePool;
  return *p;
}
}  // namespace QL_BACKEND_NS
}  // namespace ql

namespace qalora {
namespace QL_BACKEND_NS {
namespace memory {
namespace {

void* alloc(size_t bytes) { return ql::pool().get(bytes); }
void release(void* p, size_t bytes) { ql::pool().put(p, bytes); }
// From pageable memory cudaMemcpyAsync returns once the bytes are staged, so the caller may reuse its array.
void upload(void* dst, const void* src, size_t bytes) {
  if (bytes) ql::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, 0), "upload (cudaMemcpyAsync host to device)");
}
void download(void* dst, const void* src, size_t bytes) {
  if (bytes) ql::check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "download (cudaMemcpy device to host)");
}
void copy(void* dst, const void* src, size_t bytes) { ql::copy_device(dst, src, bytes); }
void sync() { ql::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
void trim() { ql::pool().trim(); }
PoolStats stats() { return ql::pool().stats(); }

}  // namespace

const DeviceMemory& table() {
  static const DeviceMemory t{QL_BACKEND_NAME, alloc, release, upload, download, copy, sync, trim, stats};
  return t;
}

}  // namespace memory
}  // namespace QL_BACKEND_NS
}  // namespace qalora
