// Forward for few rows (M ≤ maxRows, decode): one warp per output feature streams its packed row with coalesced
// vector loads, dequantizes in registers (β folded in through the block's Σx) and reduces with shuffles. With an
// adapter, pool_kernel first computes the pooled x and h = p·Aᵀ once for all blocks; without one (a merged
// model) the forward is this single kernel.
#pragma once

namespace qalora {
namespace QL_BACKEND_NS {
namespace kern {

enum PoolKind { kPoolMean = 0, kPoolSum = 1, kPoolPeft = 2 };

struct DropoutArgs {
  float p;        // probability of dropping
  float inv_keep; // 1 / (1 - p)
  int active;     // training && p > 0
  uint64_t seed;
  QL_DEV float keep(uint64_t index) const { return dropout_keep(seed, index, p) ? inv_keep : 0.0f; }
};

template <class T>
struct PoolParams {
  const T* x;            // [m, in]
  const float* lora_a;   // [rank, L]
  float* pooled;         // [m, L]  p = c·Σ_group x, dropout applied (the adapter's input)
  float* h;              // [m, rank] h = p·Aᵀ
  int64_t m, in;
  int rank;
  float pool_scale;
  DropoutArgs drop;
};

QL_DEV float warp_sum(float v) {
  QL_UNROLL for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// One block per row of x: group sums by warps (lanes over the group's inputs), then h by warps over the rank.
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) pool_kernel(PoolParams<typename C::act> p) {
  using A = ql::Act<typename C::act>;
  constexpr int G = C::group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t m = blockIdx.x, L = p.in / G;
  const typename C::act* xr = p.x + m * p.in;
  for (int64_t k = warp; k < L; k += nwarps) {
    float s = 0.0f, sd = 0.0f;
    for (int j = lane; j < G; j += 32) {
      const float v = A::to_f(xr[k * G + j]);
      s += v;
      if (C::pool == kPoolPeft && p.drop.active) sd += v * p.drop.keep((uint64_t)(m * p.in + k * G + j));
    }
    s = warp_sum(s);
    if (C::pool == kPoolPeft) sd = warp_sum(sd);
    if (lane == 0) {
      float pv = p.pool_scale * (C::pool == kPoolPeft && p.drop.active ? sd : s);
      if (C::pool != kPoolPeft && p.drop.active) pv *= p.drop.keep((uint64_t)(m * L + k));
      p.pooled[m * L + k] = pv;
    }
  }
  if (p.rank == 0) return;  // uniform across the block
  __syncthreads();          // the pooled row (global, this block's) is complete
  for (int r = warp; r < p.rank; r += nwarps) {
    float acc = 0.0f;
    for (int64_t k = lane; k < L; k += 32) acc += p.lora_a[r * L + k] * p.pooled[m * L + k];
    acc = warp_sum(acc);
    if (lane == 0) p.h[m * p.rank + r] = acc;
  }
}

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// x[0..8) as floats; `n` valid elements (8 and `aligned` take the vector path).
template <class T>
QL_DEV void load8(const T* __restrict__ src, int n, bool aligned, float (&v)[8]) {
  using A = ql::Act<T>;
  if (n >= 8 && aligned) {
    constexpr int per_vec = 16 / sizeof(T);
    QL_UNROLL for (int part = 0; part < 8 / per_vec; part++) {
      const Vec16 raw = reinterpret_cast<const Vec16*>(src)[part];
      T e[per_vec];
      memcpy(e, &raw, sizeof(raw));  // not a pointer cast: the elements must not alias the vector's words
      QL_UNROLL for (int j = 0; j < per_vec; j++) v[part * per_vec + j] = A::to_f(e[j]);
    }
  } else {
    QL_UNROLL for (int j = 0; j < 8; j++) v[j] = j < n ? A::to_f(src[j]) : 0.0f;
  }
}

// The BITS words of one 32-input block, with the widest load the layout allows.
template <int BITS>
QL_DEV void load_block(const uint32_t* __restrict__ src, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
    QL_UNROLL for (int part = 0; part < BITS / 4; part++) {
      const Vec16 raw = reinterpret_cast<const Vec16*>(src)[part];
      QL_UNROLL for (int j = 0; j < 4; j++) w[part * 4 + j] = raw.w[j];
    }
  } else if constexpr (BITS == 2) {
    struct alignas(8) Vec8 { uint32_t w[2]; };
    const Vec8 raw = *reinterpret_cast<const Vec8*>(src);
    w[0] = raw.w[0];
    w[1] = raw.w[1];
  } else {
    QL_UNROLL for (int j = 0; j < BITS; j++) w[j] = src[j];
  }
}

template <class T, class S = float>
struct GemvParams {
  const T* x;             // [m, in]
  const uint32_t* qweight;
  const S* alpha;         // S: float, or fp16 bits (`scales fp16`), read through scale_to_f32
  const S* beta;
  const float* lora_b;    // [out, rank]
  const float* h;         // [m, rank]
  T* y;                   // [m, out]
  int64_t m, in, out;
  int rank;
  float scale;
};

template <class C>
constexpr int gemv_min_blocks() {
  return 65536 / (C::gemv_threads * C::max_registers) > 0 ? 65536 / (C::gemv_threads * C::max_registers) : 1;
}

// Rows of x are a compile-time bound MR (runtime m ≤ MR) so the accumulators stay in registers.
template <class C, int MR>
__global__ void QL_LAUNCH_BOUNDS(C::gemv_threads, gemv_min_blocks<C>()) gemv_kernel(GemvParams<typename C::act, typename C::scale> p) {
  constexpr int G = C::group, BITS = C::bits, WARPS = C::gemv_threads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t L = p.in / G, nb = (p.in + 31) / 32, wpr = nb * BITS;
  const bool aligned = p.in % 8 == 0;
  const int64_t row_end = ql::tmin<int64_t>((int64_t)(blockIdx.x + 1) * C::gemv_rows_per_block, p.out);
  for (int64_t o = (int64_t)blockIdx.x * C::gemv_rows_per_block + warp; o < row_end; o += WARPS) {
    float acc[MR];
    QL_UNROLL for (int r = 0; r < MR; r++) acc[r] = 0.0f;
    const uint32_t* qrow = p.qweight + o * wpr;
    const typename C::scale* arow = p.alpha + o * L;
    const typename C::scale* brow = p.beta + o * L;
    for (int64_t b = lane; b < nb; b += 32) {
      uint32_t words[BITS];
      load_block<BITS>(qrow + b * BITS, words);
      const int64_t i0 = b * 32;
      // dot = Σ q·x and xs = Σ x over the block: with one group per block, y += α·dot + β·xs, so β costs one
      // add per input and no second pass over x.
      float dot[MR], xs[MR];
      QL_UNROLL for (int r = 0; r < MR; r++) dot[r] = xs[r] = 0.0f;
      QL_UNROLL for (int c = 0; c < 4; c++) {
        float q[8];
        unpack8<BITS>(words, c, q);
        const int64_t ic = i0 + c * 8;
        const int n = (int)ql::tmin<int64_t>(8, p.in - ic);
        if (n <= 0) break;
        if constexpr (G % 32 != 0) {  // groups cut through the block: dequantize each weight, α·q + β
          QL_UNROLL for (int e = 0; e < 8; e++) {
            const int k = (int)((ic + e) / G);
            q[e] = e < n ? fmaf(scale_to_f32(arow[k]), q[e], scale_to_f32(brow[k])) : 0.0f;
          }
        }
        QL_UNROLL for (int r = 0; r < MR; r++) {
          if (r < p.m) {
            float xv[8];
            load8(p.x + r * p.in + ic, n, aligned, xv);
            QL_UNROLL for (int e = 0; e < 8; e++) {
              dot[r] = fmaf(q[e], xv[e], dot[r]);
              if constexpr (G % 32 == 0) xs[r] += xv[e];
            }
          }
        }
      }
      if constexpr (G % 32 == 0) {
        const float a = scale_to_f32(arow[i0 / G]), bt = scale_to_f32(brow[i0 / G]);
        QL_UNROLL for (int r = 0; r < MR; r++) acc[r] = fmaf(a, dot[r], fmaf(bt, xs[r], acc[r]));
      } else {
        QL_UNROLL for (int r = 0; r < MR; r++) acc[r] += dot[r];
      }
    }
    // The adapter: s·h·Bᵀ from h = p·Aᵀ, which pool_kernel computed once for all blocks.
    for (int j = lane; j < p.rank; j += 32) {
      const float bj = p.scale * p.lora_b[o * p.rank + j];
      QL_UNROLL for (int r = 0; r < MR; r++)
        if (r < p.m) acc[r] = fmaf(bj, p.h[r * p.rank + j], acc[r]);
    }
    QL_UNROLL for (int r = 0; r < MR; r++) {
      const float v = warp_sum(acc[r]);
      if (lane == 0 && r < p.m) p.y[r * p.out + o] = ql::Act<typename C::act>::from_f(v);
    }
  }
}

}  // namespace kern
}  // namespace QL_BACKEND_NS
}  // namespace qalora
