// Fibers: one per CUDA thread. A user-space context switch is ~20 instructions; glibc's swapcontext makes a
// signal-mask syscall per switch (~9x slower) and an OS thread per CUDA thread is ~50x slower.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#if !defined(__x86_64__)
#error "qalora CUDA emulator: the fiber context switch is written for x86-64 only"
#endif

// qlemu_switch(save = rdi, next = rsi). Frame layout (from the saved sp up): mxcsr, x87 control word,
// r15, r14, r13, r12, rbx, rbp, return address. endbr64 keeps it valid under -fcf-protection.
__asm__(
    ".text\n"
    ".globl qlemu_switch\n"
    ".hidden qlemu_switch\n"
    ".type qlemu_switch,@function\n"
    "qlemu_switch:\n"
    "  endbr64\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size qlemu_switch, .-qlemu_switch\n"
    // First activation of a fiber: qlemu_switch 'returns' here with r12 = arg, r13 = entry, rsp 16-aligned.
    ".globl qlemu_fiber_start\n"
    ".hidden qlemu_fiber_start\n"
    ".type qlemu_fiber_start,@function\n"
    "qlemu_fiber_start:\n"
    "  endbr64\n"
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    ".size qlemu_fiber_start, .-qlemu_fiber_start\n");

extern "C" void qlemu_fiber_start();

namespace qlemu {

Stack stack_alloc(size_t size) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size = (size + page - 1) / page * page;
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                 -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "qalora emu: cannot map a %zu-byte fiber stack\n", size);
    abort();
  }
  mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of corrupting the neighbour
  return Stack{static_cast<char*>(p) + page, size};
}

void* fiber_prepare(const Stack& s, void (*entry)(void*), void* arg) {
  uintptr_t top = ((uintptr_t)(s.base + s.size)) & ~(uintptr_t)15;
#if defined(__SANITIZE_ADDRESS__)
  // The stack's previous fiber ended inside frames that never returned (entry, final switch): their redzones
  // are still poisoned in ASan's shadow. Clear the top of the stack, where those frames were.
  const size_t stale = s.size < 16384 ? s.size : 16384;
  __asan_unpoison_memory_region(reinterpret_cast<void*>(top - stale), stale);
#endif
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);  // 16-aligned, so rsp is 16-aligned after 'ret'
  uint32_t mxcsr;
  uint16_t fcw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fcw));
  sp[0] = (uint64_t)mxcsr | (uint64_t)fcw << 32;
  sp[1] = 0;                         // r15
  sp[2] = 0;                         // r14
  sp[3] = (uint64_t)entry;           // r13
  sp[4] = (uint64_t)arg;             // r12
  sp[5] = 0;                         // rbx
  sp[6] = 0;                         // rbp
  sp[7] = (uint64_t)&qlemu_fiber_start;
  return sp;
}

}  // namespace qlemu
