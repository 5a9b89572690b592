// The emulator's runtime counters (templates/emu/emu_counters.h) as the addon exposes them: `addon.emuCounters()`
// and `addon.emuResetCounters()`, present when the emu backend is compiled. This list is the one declaration:
// addon.cpp.njk renders the N-API object from it (a name without its C++ field fails to compile), compiler/bindings.ts
// emits the interface from it and runtime/native.ts uses the type below.

export const EMU_COUNTERS = [
  { name: 'h2dCalls', cpp: 'h2d_calls', doc: 'cudaMemcpy(Async) calls from host to device memory' },
  { name: 'h2dBytes', cpp: 'h2d_bytes', doc: 'bytes copied host → device' },
  { name: 'd2hCalls', cpp: 'd2h_calls', doc: 'copies device → host' },
  { name: 'd2hBytes', cpp: 'd2h_bytes', doc: 'bytes copied device → host' },
  { name: 'd2dCalls', cpp: 'd2d_calls', doc: 'copies device → device' },
  { name: 'd2dBytes', cpp: 'd2d_bytes', doc: 'bytes copied device → device' },
  { name: 'allocs', cpp: 'allocs', doc: 'cudaMalloc calls' },
  { name: 'allocBytes', cpp: 'alloc_bytes', doc: 'bytes cudaMalloc allocated' },
  { name: 'frees', cpp: 'frees', doc: 'cudaFree calls of live allocations' },
  { name: 'syncs', cpp: 'syncs', doc: 'host waits: cudaDevice/Stream/EventSynchronize and each blocking cudaMemcpy to or from host memory' },
  { name: 'launches', cpp: 'launches', doc: 'kernel launches' },
] as const;

/** What the emulated CUDA runtime did since the last `emuResetCounters()` (or since the addon was loaded). */
export type EmuCounters = { [K in (typeof EMU_COUNTERS)[number]['name']]: number };

