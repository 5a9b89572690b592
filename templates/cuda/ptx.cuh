// Every inline PTX statement of the CUDA kernels, each in a small wrapper. Under QALORA_EMU the wrapper calls
// the emulator's functional twin (namespace qlemu, templates/emu/cuda_emu.h), so the very same kernel source
// runs on the CPU. Collective ops (mma, ldmatrix) must be reached by all 32 lanes together.
#pragma once
#include <cstdint>

#include "runtime.cuh"

namespace ql {
inline namespace QL_BACKEND_NS {  // see runtime.cuh

QL_DEV uint32_t smem_addr(const void* p) {
#ifdef QALORA_EMU
  return 0;
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Asynchronous global → shared copy of BYTES (4, 8 or 16); lands at the matching cp_async_wait.
template <int BYTES>
QL_DEV void cp_async(void* smem_dst, const void* gmem_src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef QALORA_EMU
  qlemu::cp_async(smem_dst, gmem_src, BYTES);
#else
  if constexpr (BYTES == 16) {  // .cg: bypass L1, the tile is read once from shared memory
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src), "n"(BYTES));
  }
#endif
}

QL_DEV void cp_async_commit() {
#ifdef QALORA_EMU
  qlemu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// All but the newest N committed groups have landed (for this thread's copies; follow with __syncthreads).
template <int N>
QL_DEV void cp_async_wait() {
#ifdef QALORA_EMU
  qlemu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// d = a·b + c, m16n8k16, A row-major, B column-major, fp32 accumulate (fragment layouts: notes §3).
QL_DEV void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], __half) {
#ifdef QALORA_EMU
  qlemu::mma_m16n8k16_f16(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
QL_DEV void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], __nv_bfloat16) {
#ifdef QALORA_EMU
  qlemu::mma_m16n8k16_bf16(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// Four 8×8 b16 matrices; lane 8j+i gives the address of row i of matrix j.
QL_DEV void ldmatrix_x4(uint32_t r[4], const void* p) {
#ifdef QALORA_EMU
  qlemu::ldmatrix_x4(r, p);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
QL_DEV void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
#ifdef QALORA_EMU
  qlemu::ldmatrix_x4_trans(r, p);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// (a op b op c) for any 3-input boolean function given by its truth table LUT, in one instruction.
template <uint8_t LUT>
QL_DEV uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#ifdef QALORA_EMU
  return qlemu::lop3(a, b, c, LUT);
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#endif
}

// Byte permute: picks four bytes of {b, a} by the nibbles of sel.
QL_DEV uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef QALORA_EMU
  return qlemu::prmt(a, b, sel);
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#endif
}

}  // namespace QL_BACKEND_NS
}  // namespace ql
