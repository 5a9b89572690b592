// Constructs the emulator does not model refuse to compile, with a message naming the construct, rather than
// compiling into something silently wrong. Included last by cuda_emu.h.
#pragma once

namespace qlemu {
template <class...>
constexpr bool unsupported = false;
}

// Fires only where the macro is used: static_assert(false) in a non-template lambda fails at that point.
#define QLEMU_REFUSED(message) \
  ([]() -> int { static_assert(::qlemu::unsupported<>, "qalora CUDA emulator: " message); return 0; }())

// Declares a template that refuses when instantiated, so explicit template arguments (tex1Dfetch<float>(...))
// reach the message too.
#define QLEMU_REFUSE_FN(name, why)                                                                   \
  template <class... A>                                                                            \
  inline int name(A...) {                                                                          \
    static_assert(::qlemu::unsupported<A...>, "qalora CUDA emulator: " #name " is not supported: " why); \
    return 0;                                                                                      \
  }

// Texture and surface objects: no texture units to model.
QLEMU_REFUSE_FN(tex1Dfetch, "texture objects")
QLEMU_REFUSE_FN(tex1D, "texture objects")
QLEMU_REFUSE_FN(tex2D, "texture objects")
QLEMU_REFUSE_FN(tex3D, "texture objects")
QLEMU_REFUSE_FN(tex2DLayered, "texture objects")
QLEMU_REFUSE_FN(surf1Dread, "surface objects")
QLEMU_REFUSE_FN(surf1Dwrite, "surface objects")
QLEMU_REFUSE_FN(surf2Dread, "surface objects")
QLEMU_REFUSE_FN(surf2Dwrite, "surface objects")
// Runtime API calls cudart declares (cuda_fp16.h includes its header): macros, so the real ones cannot win.
#define cudaCreateTextureObject(...) QLEMU_REFUSED("cudaCreateTextureObject is not supported: texture objects")
#define cudaCreateSurfaceObject(...) QLEMU_REFUSED("cudaCreateSurfaceObject is not supported: surface objects")
// Launches other than QL_LAUNCH, cooperative (grid-synchronising) launches, symbols copied from the host.
#define cudaLaunchKernel(...) QLEMU_REFUSED("cudaLaunchKernel is not supported: launch through QL_LAUNCH")
#define cudaLaunchCooperativeKernel(...) \
  QLEMU_REFUSED("cudaLaunchCooperativeKernel is not supported: cooperative launches (grid-wide synchronisation)")
#define cudaMemcpyToSymbol(...) QLEMU_REFUSED("cudaMemcpyToSymbol is not supported: pass device buffers as arguments")
#define cudaMemcpyFromSymbol(...) \
  QLEMU_REFUSED("cudaMemcpyFromSymbol is not supported: pass device buffers as arguments")

// Cooperative groups: cooperative_groups.h becomes an empty include (its guard is defined here) and every
// entry point into the namespace refuses.
#define _COOPERATIVE_GROUPS_H_
namespace cooperative_groups {
QLEMU_REFUSE_FN(this_thread_block, "cooperative groups: use __syncthreads and the *_sync intrinsics")
QLEMU_REFUSE_FN(this_grid, "cooperative groups: grid-wide synchronisation")
QLEMU_REFUSE_FN(this_thread, "cooperative groups: use threadIdx")
QLEMU_REFUSE_FN(tiled_partition, "cooperative groups: use the *_sync intrinsics with explicit masks")
QLEMU_REFUSE_FN(coalesced_threads, "cooperative groups: its result depends on divergence the emulator does not model")
QLEMU_REFUSE_FN(sync, "cooperative groups: use __syncthreads")
}  // namespace cooperative_groups
#undef QLEMU_REFUSE_FN

// __activemask's value depends on how the hardware happened to converge; the emulator does not model that.
#define __activemask() \
  QLEMU_REFUSED("__activemask() is not supported: its result depends on warp divergence; pass an explicit mask")
#undef __managed__
#define __managed__ static_assert(::qlemu::unsupported<>, "qalora CUDA emulator: __managed__ memory is not supported: use cudaMalloc");
// Inline PTX cannot run on the CPU: every asm statement belongs in templates/cuda/ptx.cuh with a C++ twin.
#define asm qalora_emulator_refuses_inline_asm__put_PTX_in_ptx_cuh_with_a_QALORA_EMU_twin
