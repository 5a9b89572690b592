// The emulator's engine room as seen from kernel code: the per-CUDA-thread state that threadIdx & co. read,
// the blocking operations (barriers, warp collectives) and the launch entry point. Implemented in
// emu_sched.cpp; no CUDA header is needed here so the runtime sources can include it alone.
#pragma once
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector_types.h>  // uint3, dim3 (plain structs, compile under g++)

namespace qlemu {

// What a running CUDA thread can see of itself. The scheduler points `qlemu_current` at the running fiber's
// state on every switch: a fiber is not an OS thread, so thread_local would be shared by a whole block.
struct ThreadState {
  uint3 threadIdx;
  uint3 blockIdx;
  dim3 blockDim;
  dim3 gridDim;
  unsigned lane;  // linear thread index % 32
  void* fiber;    // the scheduler's record of this thread
};

// Where an intrinsic was called from, for deadlock reports.
struct Site {
  const char* file;
  int line;
};

// Warp-collective operations the scheduler completes once every lane in the mask has arrived.
enum class WarpOp : uint8_t {
  syncwarp,
  shfl_idx,
  shfl_up,
  shfl_down,
  shfl_bfly,
  ballot,
  any,
  all,
  reduce_add,
  reduce_min,
  reduce_max,
  reduce_and,
  reduce_or,
  reduce_xor,
  match_any,
  mma_f16,
  mma_bf16,
  ldmatrix,
};

// One lane's arrival at a warp collective: its inputs and where its result goes (both on its own stack;
// the lane that completes the collective reads and writes them for the whole warp).
struct WarpCall {
  WarpOp op;
  unsigned mask;
  const void* in;
  void* out;
  int size;   // bytes of the value (shuffles) or ldmatrix matrices count
  int a, b;   // op parameters: shuffle lane/delta and width; ldmatrix transpose flag
  const char* what;
};

void syncthreads(Site at);
int syncthreads_reduce(Site at, int pred, int how /*0 count, 1 and, 2 or*/);
void warp_collective(Site at, const WarpCall& call);
[[noreturn]] void fatal_in_kernel(Site at, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void* dynamic_smem();

// ---- Launch -----------------------------------------------------------------------------------------------
struct LaunchDesc {
  const void* kernel;  // identity, for cudaFuncSetAttribute limits
  const char* name;
  Site at;
  dim3 grid, block;
  size_t smem;
  void (*thunk)(const void* ctx);  // runs the kernel body once for the current CUDA thread
  const void* ctx;
};
int launch(const LaunchDesc& d);  // returns a cudaError_t value

template <class... P>
struct Launcher {
  void (*fn)(P...);
  LaunchDesc desc;
  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "QL_LAUNCH: wrong number of kernel arguments");
    using Args = std::tuple<std::decay_t<P>...>;
    struct Ctx {
      void (*fn)(P...);
      Args args;
    } ctx{fn, Args(std::forward<A>(args)...)};
    LaunchDesc d = desc;
    // std::apply copies each argument into the kernel's by-value parameters: every CUDA thread gets its own.
    d.thunk = [](const void* c) {
      const Ctx* x = static_cast<const Ctx*>(c);
      std::apply(x->fn, x->args);
    };
    d.ctx = &ctx;
    launch(d);
  }
};

template <class... P>
Launcher<P...> make_launcher(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, const void* /*stream*/,
                             const char* name, const char* file, int line) {
  return Launcher<P...>{fn, LaunchDesc{reinterpret_cast<const void*>(fn), name, Site{file, line}, grid, block, smem,
                                       nullptr, nullptr}};
}

// ---- Limits (an sm_80-class device) -------------------------------------------------------------------------
constexpr size_t kDefaultDynSmem = 48 * 1024;    // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kMaxDynSmemOptIn = 163 * 1024;  // sm_80's opt-in ceiling
void set_max_dynamic_smem(const void* kernel, int bytes);

// ---- PTX twins (called by templates/cuda/ptx.cuh under QALORA_EMU) -----------------------------------------
void cp_async(void* smem_dst, const void* gmem_src, int bytes);
void cp_async_zfill(void* smem_dst, const void* gmem_src, int bytes, int src_bytes);  // src_bytes < bytes: zeros
void cp_async_commit();
void cp_async_wait(int n);
void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void ldmatrix_x1(uint32_t r[1], const void* p);
void ldmatrix_x2(uint32_t r[2], const void* p);
void ldmatrix_x4(uint32_t r[4], const void* p);
void ldmatrix_x1_trans(uint32_t r[1], const void* p);
void ldmatrix_x2_trans(uint32_t r[2], const void* p);
void ldmatrix_x4_trans(uint32_t r[4], const void* p);

inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint8_t lut) {
  // Bit i of lut is the result for (a, b, c) = (i>>2 & 1, i>>1 & 1, i & 1), as PTX's 0xF0/0xCC/0xAA encoding.
  uint32_t r = 0;
  for (int i = 0; i < 8; i++)
    if (lut >> i & 1) r |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  return r;
}

inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t bytes = (uint64_t)b << 32 | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; i++) {
    const uint32_t s = sel >> (4 * i) & 0xf;
    uint32_t v = (uint32_t)(bytes >> (8 * (s & 7))) & 0xff;
    if (s & 8) v = (v & 0x80) ? 0xff : 0;  // sign-replicate mode
    r |= v << (8 * i);
  }
  return r;
}

}  // namespace qlemu

extern __thread qlemu::ThreadState* qlemu_current;
