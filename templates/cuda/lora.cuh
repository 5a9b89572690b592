// The adapter's rank-sized work: backward reductions (dh; dB = s·dyᵀ·h and dA = dhᵀ·p through row-chunked
// partial sums; the per-group gradient of the pooled input)
// and merge β' = β + s·c·(B·A). All of it is O((m + out)·rank·L) against the base path's O(m·out·in).
#pragma once

namespace qalora {
namespace QL_BACKEND_NS {
namespace kern {

template <class T>
struct LoraGradParams {
  const T* dy;           // [m, out]
  const float* lora_a;   // [rank, L]
  const float* lora_b;   // [out, rank]
  const float* pooled;   // [m, L]   p as the forward saw it (dropout applied)
  const float* h;        // [m, rank]
  float* dh;             // [m, rank]  s·dy·B
  float* dpx;            // [m, L]     c·(dh·A), dropout mask of p applied (mean/sum)
  int64_t m, in, out, L;
  int rank;
  float scale, pool_scale;
  DropoutArgs drop;
};

// One block per row of dy; warps over the rank, lanes over the outputs (coalesced dy).
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) lora_dh_kernel(LoraGradParams<typename C::act> p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t m = blockIdx.x;
  for (int r = warp; r < p.rank; r += nwarps) {
    float acc = 0.0f;
    for (int64_t o = lane; o < p.out; o += 32)
      acc = fmaf(ql::Act<typename C::act>::to_f(p.dy[m * p.out + o]), p.lora_b[o * p.rank + r], acc);
    acc = warp_sum(acc);
    if (lane == 0) p.dh[m * p.rank + r] = p.scale * acc;
  }
}

// dB and dA are reductions over the M rows; M runs to thousands in training while out·rank or rank·L can be
// small, so the rows are split into chunks (blockIdx.y) that write partial sums, added up in a fixed order by
// lora_reduce_kernel: parallel and deterministic (no atomics).
struct ChunkArgs {
  float* partial;  // [chunks, n]
  int64_t rows;    // rows per chunk
};

// Thread per (o, r), r fastest: h rows are read coalesced, dy broadcast.
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) lora_grad_b_kernel(LoraGradParams<typename C::act> p, ChunkArgs ch) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = p.out * p.rank;
  if (idx >= n) return;
  const int64_t o = idx / p.rank, r = idx % p.rank, m0 = blockIdx.y * ch.rows, m1 = ql::tmin<int64_t>(p.m, m0 + ch.rows);
  float acc = 0.0f;
  for (int64_t m = m0; m < m1; m++) acc = fmaf(ql::Act<typename C::act>::to_f(p.dy[m * p.out + o]), p.h[m * p.rank + r], acc);
  ch.partial[blockIdx.y * n + idx] = acc;
}

// Thread per (r, k), k fastest: pooled rows coalesced.
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) lora_grad_a_kernel(LoraGradParams<typename C::act> p, ChunkArgs ch) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = (int64_t)p.rank * p.L;
  if (idx >= n) return;
  const int64_t r = idx / p.L, k = idx % p.L, m0 = blockIdx.y * ch.rows, m1 = ql::tmin<int64_t>(p.m, m0 + ch.rows);
  float acc = 0.0f;
  for (int64_t m = m0; m < m1; m++) acc = fmaf(p.dh[m * p.rank + r], p.pooled[m * p.L + k], acc);
  ch.partial[blockIdx.y * n + idx] = acc;
}

template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) lora_reduce_kernel(const float* __restrict__ partial, int chunks, int64_t n,
                                                            float scale, float* __restrict__ out) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  float acc = 0.0f;
  for (int c = 0; c < chunks; c++) acc += partial[c * n + idx];
  out[idx] = scale * acc;
}

// Thread per (m, k): the gradient every input of group k receives through the adapter.
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) lora_dpx_kernel(LoraGradParams<typename C::act> p) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.m * p.L) return;
  const int64_t m = idx / p.L, k = idx % p.L;
  float acc = 0.0f;
  for (int r = 0; r < p.rank; r++) acc = fmaf(p.dh[m * p.rank + r], p.lora_a[r * p.L + k], acc);
  acc *= p.pool_scale;
  if (C::pool != kPoolPeft && p.drop.active) acc *= p.drop.keep((uint64_t)idx);
  p.dpx[idx] = acc;
}

// Thread per (o, k): the adapter is constant over a group, so it folds into that group's offset (computed in
// fp32, stored as C::scale: for fp16 scales the merge's one rounding).
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) merge_kernel(const typename C::scale* __restrict__ beta,
                                                      const float* __restrict__ lora_a,
                                                      const float* __restrict__ lora_b, int64_t out, int64_t L,
                                                      int rank, float factor, typename C::scale* __restrict__ beta_out) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= out * L) return;
  const int64_t o = idx / L, k = idx % L;
  float acc = 0.0f;
  for (int r = 0; r < rank; r++) acc = fmaf(lora_b[o * rank + r], lora_a[r * L + k], acc);
  store_scale(fmaf(factor, acc, scale_to_f32(beta[idx])), &beta_out[idx]);
}

}  // namespace kern
}  // namespace QL_BACKEND_NS
}  // namespace qalora
