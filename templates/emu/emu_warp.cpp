// Warp collectives, executed once by the last lane to arrive, for every lane in the mask: shuffles, votes,
// reductions, match, and the warp-wide PTX instructions (mma.sync, ldmatrix) whose fragments are spread
// over the 32 lanes (layouts: notes §3, PTX ISA "Matrix fragments for mma.m16n8k16").
#include <cstdio>
#include <cstring>

#include "emu_internal.h"

namespace qlemu {

namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = h >> 10 & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {
      exp = 113;
      while (!(man & 0x400)) man <<= 1, exp--;
      u = sign | exp << 23 | (man & 0x3ff) << 13;
    }
  } else {
    u = sign | (exp == 31 ? 0x7f800000u | man << 13 : (exp + 112) << 23 | man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// PTX shfl.sync lane selection (ISA "shfl.sync"): c packs the segment mask and the clamp lane.
int shfl_source(WarpOp op, int lane, int bval, int width) {
  const int segmask = (32 - width) & 31;
  const int clamp = op == WarpOp::shfl_up ? 0 : 31;
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  int j;
  bool ok;
  switch (op) {
    case WarpOp::shfl_up: j = lane - bval, ok = j >= max_lane; break;
    case WarpOp::shfl_down: j = lane + bval, ok = j <= max_lane; break;
    case WarpOp::shfl_bfly: j = lane ^ (bval & 31), ok = j <= max_lane; break;
    default: j = min_lane | (bval & ~segmask & 31), ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}

void mma_m16n8k16(Fiber* lanes[32], bool bf16) {
  float A[16][16], B[16][8], C[16][8];
  auto cvt = [&](uint32_t v, int hi) { return (bf16 ? bf16_to_float : half_to_float)((uint16_t)(v >> (16 * hi))); };
  for (int l = 0; l < 32; l++) {
    const MmaIn& in = *static_cast<const MmaIn*>(lanes[l]->call.in);
    const int g = l >> 2, t = l & 3;
    for (int h = 0; h < 2; h++) {
      A[g][2 * t + h] = cvt(in.a[0], h);
      A[g + 8][2 * t + h] = cvt(in.a[1], h);
      A[g][2 * t + 8 + h] = cvt(in.a[2], h);
      A[g + 8][2 * t + 8 + h] = cvt(in.a[3], h);
      B[2 * t + h][g] = cvt(in.b[0], h);
      B[2 * t + 8 + h][g] = cvt(in.b[1], h);
      C[g][2 * t + h] = in.c[h];
      C[g + 8][2 * t + h] = in.c[2 + h];
    }
  }
  // Products of two 16-bit floats are exact in double; the tensor core's own summation order is unspecified.
  float D[16][8];
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 8; j++) {
      double s = C[i][j];
      for (int k = 0; k < 16; k++) s += (double)A[i][k] * B[k][j];
      D[i][j] = (float)s;
    }
  for (int l = 0; l < 32; l++) {  // outputs only now: d may alias c
    float* d = static_cast<float*>(lanes[l]->call.out);
    const int g = l >> 2, t = l & 3;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

void ldmatrix(Fiber* lanes[32], int count, bool trans, Site at) {
  uint16_t rows[4][8][8];  // [matrix][row][element]; matrix j's row i comes from lane 8j + i
  for (int j = 0; j < count; j++)
    for (int i = 0; i < 8; i++) {
      const void* p = lanes[8 * j + i]->call.in;
      if ((uintptr_t)p % 16)
        fatal_in_kernel(at, "ldmatrix: lane %d's row address %p is not 16-byte aligned", 8 * j + i, p);
      memcpy(rows[j][i], p, 16);
    }
  for (int l = 0; l < 32; l++) {
    uint32_t* r = static_cast<uint32_t*>(lanes[l]->call.out);
    const int q = l >> 2, e = 2 * (l & 3);
    for (int j = 0; j < count; j++)
      r[j] = trans ? (uint32_t)rows[j][e][q] | (uint32_t)rows[j][e + 1][q] << 16
                   : (uint32_t)rows[j][q][e] | (uint32_t)rows[j][q][e + 1] << 16;
  }
}

uint32_t load32(const void* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

}  // namespace

void execute_warp_op(Fiber* lanes[32], unsigned mask, Site at) {
  const WarpCall& c0 = [&]() -> const WarpCall& {
    for (int l = 0; l < 32; l++)
      if (lanes[l]) return lanes[l]->call;
    __builtin_unreachable();
  }();
  switch (c0.op) {
    case WarpOp::syncwarp: return;
    case WarpOp::shfl_idx:
    case WarpOp::shfl_up:
    case WarpOp::shfl_down:
    case WarpOp::shfl_bfly: {
      const int width = c0.b;
      if (width < 1 || width > 32 || (width & (width - 1)))
        fatal_in_kernel(at, "%s: width %d is not a power of two in [1, 32]", c0.what, width);
      for (int l = 0; l < 32; l++) {
        if (!lanes[l]) continue;
        const WarpCall& c = lanes[l]->call;
        const int src = shfl_source(c.op, l, c.a, width);
        // Reading a lane outside the mask is undefined in CUDA: hand back all-ones bits (NaN, -1), not a
        // value that could pass for right.
        if (lanes[src])
          memcpy(c.out, lanes[src]->call.in, c.size);
        else
          memset(c.out, 0xff, c.size);
      }
      return;
    }
    case WarpOp::ballot:
    case WarpOp::any:
    case WarpOp::all: {
      unsigned bits = 0;
      for (int l = 0; l < 32; l++)
        if (lanes[l] && *static_cast<const int*>(lanes[l]->call.in)) bits |= 1u << l;
      const unsigned r = c0.op == WarpOp::ballot ? bits : c0.op == WarpOp::any ? bits != 0 : bits == mask;
      for (int l = 0; l < 32; l++)
        if (lanes[l]) memcpy(lanes[l]->call.out, &r, 4);
      return;
    }
    case WarpOp::reduce_add:
    case WarpOp::reduce_min:
    case WarpOp::reduce_max:
    case WarpOp::reduce_and:
    case WarpOp::reduce_or:
    case WarpOp::reduce_xor: {
      const bool is_signed = c0.a != 0;
      bool first = true;
      uint32_t acc = 0;
      for (int l = 0; l < 32; l++) {
        if (!lanes[l]) continue;
        const uint32_t v = load32(lanes[l]->call.in);
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (c0.op) {
          case WarpOp::reduce_add: acc += v; break;
          case WarpOp::reduce_min: acc = is_signed ? ((int32_t)v < (int32_t)acc ? v : acc) : (v < acc ? v : acc); break;
          case WarpOp::reduce_max: acc = is_signed ? ((int32_t)v > (int32_t)acc ? v : acc) : (v > acc ? v : acc); break;
          case WarpOp::reduce_and: acc &= v; break;
          case WarpOp::reduce_or: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      for (int l = 0; l < 32; l++)
        if (lanes[l]) memcpy(lanes[l]->call.out, &acc, 4);
      return;
    }
    case WarpOp::match_any: {
      for (int l = 0; l < 32; l++) {
        if (!lanes[l]) continue;
        unsigned m = 0;
        for (int k = 0; k < 32; k++)
          if (lanes[k] && memcmp(lanes[k]->call.in, lanes[l]->call.in, c0.size) == 0) m |= 1u << k;
        memcpy(lanes[l]->call.out, &m, 4);
      }
      return;
    }
    case WarpOp::mma_f16:
    case WarpOp::mma_bf16:
    case WarpOp::ldmatrix:
      if (mask != 0xffffffffu)
        fatal_in_kernel(at, "%s is warp-wide (.sync.aligned): all 32 lanes must execute it, mask was 0x%08x", c0.what,
                        mask);
      if (c0.op == WarpOp::ldmatrix)
        ldmatrix(lanes, c0.size, c0.a != 0, at);
      else
        mma_m16n8k16(lanes, c0.op == WarpOp::mma_bf16);
      return;
  }
}

}  // namespace qlemu
