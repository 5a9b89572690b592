// The runtime API subset on host memory (see emu_api.h). Every call is synchronous: kernels have finished
// when QL_LAUNCH returns, so streams and events only keep their bookkeeping. Device memory is tracked block
// by block, so a copy is classified by where its pointers really are (and refused when the kind disagrees or
// it runs past its block), counted (emu_counters.h), and freed blocks are poisoned before malloc sees them.
#include "emu_api.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "emu_counters.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define QLEMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define QLEMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define QLEMU_POISON(p, n) ((void)(p), (void)(n))
#define QLEMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace qlemu {

// CUDA keeps the last error per host thread; a failed launch records it here too (emu_sched.cpp).
static thread_local cudaError_t last_error = cudaSuccess;

int api_record_error(int code) {
  if (code != cudaSuccess) last_error = (cudaError_t)code;
  return code;
}

namespace {

// Freed device memory reads as this (bytes ff 7f: 0x7fff7fff, NaN as fp32, fp16 and bf16 alike), distinct from
// the 0xff of memory nobody wrote. A freed block stays poisoned in a FIFO quarantine (and, under ASan, marked
// unaddressable: a use after free is reported as use-after-poison) until kQuarantineBytes newer bytes are freed.
constexpr unsigned char kFreedPattern[2] = {0xff, 0x7f};
constexpr size_t kQuarantineBytes = (size_t)64 << 20;

struct Memory {
  std::mutex mu;
  std::map<uintptr_t, size_t> live;  // base → bytes of every live cudaMalloc block
  std::deque<std::pair<void*, size_t>> quarantine;
  size_t quarantined = 0;
  Counters counters{};
};

Memory& memory() {
  static Memory* m = new Memory;  // never destroyed: pool threads and static destructors may still free
  return *m;
}

void fill_freed(void* p, size_t bytes) {
  unsigned char* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < bytes; i++) b[i] = kFreedPattern[i & 1];
}

// Where [p, p + bytes) lies: in one live device block, partly past the end of one, or in host memory.
enum class Place { host, device, overflow };
struct Located {
  Place place;
  uintptr_t base;
  size_t size;
};
Located locate(Memory& m, const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = m.live.upper_bound(a);
  if (it == m.live.begin()) return {Place::host, 0, 0};
  --it;
  const uintptr_t base = it->first;
  const size_t size = it->second;
  if (a >= base + std::max<size_t>(size, 1)) return {Place::host, 0, 0};
  return {a + bytes <= base + size ? Place::device : Place::overflow, base, size};
}

const char* kind_name(cudaMemcpyKind k) {
  switch (k) {
    case cudaMemcpyHostToHost: return "cudaMemcpyHostToHost";
    case cudaMemcpyHostToDevice: return "cudaMemcpyHostToDevice";
    case cudaMemcpyDeviceToHost: return "cudaMemcpyDeviceToHost";
    case cudaMemcpyDeviceToDevice: return "cudaMemcpyDeviceToDevice";
    default: return "cudaMemcpyDefault";
  }
}

// A call a GPU would reject (or silently corrupt memory with): say why on stderr, return the CUDA error.
cudaError_t refuse(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
cudaError_t refuse(const char* fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "qalora emu: %s\n", msg);
  return (cudaError_t)api_record_error(cudaErrorInvalidValue);
}

cudaError_t copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, bool blocking) {
  if (!bytes) return cudaSuccess;
  if (!dst || !src) return (cudaError_t)api_record_error(cudaErrorInvalidValue);
  Memory& m = memory();
  {
    std::lock_guard<std::mutex> lock(m.mu);
    const Located d = locate(m, dst, bytes), s = locate(m, src, bytes);
    const char* call = blocking ? "cudaMemcpy" : "cudaMemcpyAsync";
    for (const auto& [end, at, loc] : {std::tuple{"destination", (const void*)dst, d}, std::tuple{"source", src, s}})
      if (loc.place == Place::overflow)
        return refuse("%s(%s, %zu bytes): the %s %p runs %zu bytes past the end of its %zu-byte device allocation",
                      call, kind_name(kind), bytes, end, at,
                      (size_t)(reinterpret_cast<uintptr_t>(at) + bytes - (loc.base + loc.size)), loc.size);
    const bool dd = d.place == Place::device, sd = s.place == Place::device;
    const bool fits = kind == cudaMemcpyDefault || (kind == cudaMemcpyHostToHost && !dd && !sd) ||
                      (kind == cudaMemcpyHostToDevice && dd && !sd) || (kind == cudaMemcpyDeviceToHost && !dd && sd) ||
                      (kind == cudaMemcpyDeviceToDevice && dd && sd);
    if (!fits)
      return refuse("%s(%s, %zu bytes): the destination %p is %s memory and the source %p is %s memory",
                    call, kind_name(kind), bytes, dst, dd ? "device" : "host (or freed)",
                    src, sd ? "device" : "host (or freed)");
    Counters& c = m.counters;
    if (dd && sd) c.d2d_calls++, c.d2d_bytes += bytes;
    if (dd && !sd) c.h2d_calls++, c.h2d_bytes += bytes;
    if (!dd && sd) c.d2h_calls++, c.d2h_bytes += bytes;
    if (blocking && !(dd && sd)) c.syncs++;
  }
  memcpy(dst, src, bytes);
  return cudaSuccess;
}

void count_sync() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.counters.syncs++;
}

}  // namespace

void count_launch() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.counters.launches++;
}

Counters counters() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  return m.counters;
}

void reset_counters() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.counters = Counters{};
}

}  // namespace qlemu

struct CUevent_st {
  std::chrono::steady_clock::time_point at;
};

namespace qlemu::api {

static cudaError_t fail(cudaError_t e) { return (cudaError_t)api_record_error(e); }

cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (!p) return fail(cudaErrorInvalidValue);
  // Real device memory is not zeroed: fill with all-ones bits so a kernel that reads what nobody wrote sees
  // NaN / -1 instead of a lucky zero.
  *p = malloc(bytes ? bytes : 1);
  if (!*p) return fail(cudaErrorMemoryAllocation);
  memset(*p, 0xff, bytes);
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.live[reinterpret_cast<uintptr_t>(*p)] = bytes;
  m.counters.allocs++;
  m.counters.alloc_bytes += bytes;
  return cudaSuccess;
}
// Pinned host memory is host memory: copies from it count as host traffic.
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  if (!p) return fail(cudaErrorInvalidValue);
  *p = malloc(bytes ? bytes : 1);
  if (!*p) return fail(cudaErrorMemoryAllocation);
  memset(*p, 0xff, bytes);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  Memory& m = memory();
  std::vector<std::pair<void*, size_t>> release;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    auto it = m.live.find(reinterpret_cast<uintptr_t>(p));
    if (it == m.live.end())
      return refuse("cudaFree(%p): not the start of a live device allocation (freed twice, or host memory?)", p);
    const size_t bytes = it->second;
    m.live.erase(it);
    m.counters.frees++;
    fill_freed(p, bytes);
    QLEMU_POISON(p, bytes);
    m.quarantine.emplace_back(p, bytes);
    m.quarantined += bytes;
    while (m.quarantined > kQuarantineBytes) {
      release.push_back(m.quarantine.front());
      m.quarantined -= m.quarantine.front().second;
      m.quarantine.pop_front();
    }
  }
  for (auto [q, bytes] : release) {
    QLEMU_UNPOISON(q, bytes);
    free(q);
  }
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return copy(dst, src, bytes, kind, true);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return copy(dst, src, bytes, kind, false);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (!bytes) return cudaSuccess;
  if (!p) return fail(cudaErrorInvalidValue);
  {
    Memory& m = memory();
    std::lock_guard<std::mutex> lock(m.mu);
    const Located at = locate(m, p, bytes);
    if (at.place != Place::device)
      return refuse(at.place == Place::host ? "cudaMemset(%p, %zu bytes): not device memory"
                                            : "cudaMemset(%p, %zu bytes): runs past the end of its device allocation",
                    p, bytes);
  }
  memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
void poison(void* p, size_t bytes) { fill_freed(p, bytes); }
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  if (free_bytes) *free_bytes = (size_t)16 << 30;
  if (total_bytes) *total_bytes = (size_t)16 << 30;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  count_sync();
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  count_sync();
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  static char token;  // any non-null handle: there is only one (synchronous) queue
  *stream = reinterpret_cast<cudaStream_t>(&token);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) { return cudaStreamCreate(stream); }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st{std::chrono::steady_clock::now()};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  event->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  count_sync();
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  memset(p, 0, sizeof *p);
  strcpy(p->name, "qalora CUDA emulator");
  p->major = 8;  // the PTX twins cover sm_80 features: mma.sync, ldmatrix, cp.async
  p->minor = 0;
  p->totalGlobalMem = (size_t)16 << 30;
  p->sharedMemPerBlock = kDefaultDynSmem;
  p->sharedMemPerBlockOptin = kMaxDynSmemOptIn;
  p->sharedMemPerMultiprocessor = kMaxDynSmemOptIn + 1024;
  p->regsPerBlock = 65536;
  p->regsPerMultiprocessor = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->multiProcessorCount = (int)std::max(1u, std::thread::hardware_concurrency());
  p->l2CacheSize = 1 << 20;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e != cudaSuccess) return e;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return fail(cudaErrorNotSupported);
  }
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > kMaxDynSmemOptIn) return fail(cudaErrorInvalidValue);
    set_max_dynamic_smem(kernel, value);
  }
  return cudaSuccess;  // other attributes (carveout, cluster shape, ...) only tune performance
}

}  // namespace qlemu::api
