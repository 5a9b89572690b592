// Functional twins of the PTX wrappers in templates/cuda/ptx.cuh. cp.async reads its source at issue but
// writes shared memory only at the cp.async.wait_group that covers it, so a missing wait leaves stale data
// in place exactly where a GPU would race.
#include <algorithm>
#include <cstring>

#include "emu_internal.h"

namespace qlemu {

namespace {

Fiber& fiber_for(const char* what) {
  Fiber* f = current_fiber();
  if (!f) fatal_in_kernel(Site{__FILE__, __LINE__}, "%s called outside a kernel", what);
  return *f;
}

void issue_copy(void* dst, const void* src, int bytes, int src_bytes) {
  Fiber& f = fiber_for("cp.async");
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fatal_in_kernel(Site{__FILE__, __LINE__}, "cp.async: size %d is not 4, 8 or 16 bytes", bytes);
  if ((uintptr_t)dst % bytes || (uintptr_t)src % bytes)
    fatal_in_kernel(Site{__FILE__, __LINE__}, "cp.async: addresses %p <- %p are not %d-byte aligned", dst, src, bytes);
  CpAsyncCopy c;
  c.dst = dst;
  c.group = f.open_group;
  c.bytes = bytes;
  memset(c.data, 0, sizeof c.data);
  if (src_bytes > 0) memcpy(c.data, src, std::min(src_bytes, bytes));
  f.copies.push_back(c);
}

}  // namespace

void cp_async(void* smem_dst, const void* gmem_src, int bytes) { issue_copy(smem_dst, gmem_src, bytes, bytes); }

void cp_async_zfill(void* smem_dst, const void* gmem_src, int bytes, int src_bytes) {
  issue_copy(smem_dst, gmem_src, bytes, src_bytes);
}

void cp_async_commit() { fiber_for("cp.async.commit_group").open_group++; }

void cp_async_wait(int n) {
  Fiber& f = fiber_for("cp.async.wait_group");
  // Committed groups are [0, open_group); all but the newest n land now, in issue order.
  const unsigned landed = f.open_group > (unsigned)n ? f.open_group - (unsigned)n : 0;
  size_t keep = 0;
  for (size_t i = 0; i < f.copies.size(); i++) {
    CpAsyncCopy& c = f.copies[i];
    if (c.group < landed)
      memcpy(c.dst, c.data, c.bytes);
    else
      f.copies[keep++] = c;
  }
  f.copies.resize(keep);
}

// ---- Warp-wide instructions -----------------------------------------------------------------------------------

namespace {

void mma(WarpOp op, const char* what, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const MmaIn in{a, b, c};
  warp_collective(Site{"ptx.cuh", 0}, WarpCall{op, 0xffffffffu, &in, d, 0, 0, 0, what});
}

void ldm(const char* what, uint32_t* r, const void* p, int count, bool trans) {
  warp_collective(Site{"ptx.cuh", 0}, WarpCall{WarpOp::ldmatrix, 0xffffffffu, p, r, count, trans, 0, what});
}

}  // namespace

void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  mma(WarpOp::mma_f16, "mma.sync.m16n8k16.f32.f16.f16.f32", d, a, b, c);
}
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  mma(WarpOp::mma_bf16, "mma.sync.m16n8k16.f32.bf16.bf16.f32", d, a, b, c);
}
void ldmatrix_x1(uint32_t r[1], const void* p) { ldm("ldmatrix.x1", r, p, 1, false); }
void ldmatrix_x2(uint32_t r[2], const void* p) { ldm("ldmatrix.x2", r, p, 2, false); }
void ldmatrix_x4(uint32_t r[4], const void* p) { ldm("ldmatrix.x4", r, p, 4, false); }
void ldmatrix_x1_trans(uint32_t r[1], const void* p) { ldm("ldmatrix.x1.trans", r, p, 1, true); }
void ldmatrix_x2_trans(uint32_t r[2], const void* p) { ldm("ldmatrix.x2.trans", r, p, 2, true); }
void ldmatrix_x4_trans(uint32_t r[4], const void* p) { ldm("ldmatrix.x4.trans", r, p, 4, true); }

}  // namespace qlemu
