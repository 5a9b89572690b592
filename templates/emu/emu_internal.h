// Internals shared by the emulator's runtime sources (not seen by kernel code).
#pragma once
#include <cstdint>
#include <vector>

#include "emu_core.h"

namespace qlemu {

// A fiber stack: mmap'd with a guard page below, reused across blocks by the worker that owns it.
struct Stack {
  char* base = nullptr;  // lowest usable byte (above the guard page)
  size_t size = 0;
};
Stack stack_alloc(size_t size);

// Switch from the running context to another: saves callee-saved registers and the FP control words on
// the current stack, stores its stack pointer in *save, and resumes the context whose stack pointer is next.
extern "C" void qlemu_switch(void** save, void* next);
// Prepares a fresh stack so that switching to it calls entry(arg) on it; returns its stack pointer.
void* fiber_prepare(const Stack& s, void (*entry)(void*), void* arg);

enum class State : uint8_t { ready, running, barrier, warp, exited };

struct CpAsyncCopy {
  void* dst;
  unsigned group;
  int bytes;
  alignas(16) unsigned char data[16];  // the source is read at issue, the destination written at the wait
};

struct Block;

// What each lane hands to an mma.sync collective.
struct MmaIn {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

struct Fiber {
  ThreadState ts;
  Block* block;
  int linear;  // linear thread index in the block
  State state;
  Site site;        // where it waits
  const char* what; // what it waits at
  WarpCall call;
  int pred;  // __syncthreads_count/and/or input, then result
  void* sp;
  Stack stack;
  void* asan_fake_stack;
  std::vector<CpAsyncCopy> copies;
  unsigned open_group;  // cp.async group being filled; earlier ones are committed
};

Fiber* current_fiber();  // null outside kernel code
void count_launch();     // emu_api.cpp keeps the counters (emu_counters.h)

}  // namespace qlemu
