// Core (non-QA-LoRA) ops on the GPU: the same C++ signatures as qalora::core (templates/core/core_ops.h), in
// namespace qalora::<backend>::core. Device pointers in (backend-owned tensors, or host arrays the addon staged);
// each entry point queues its launches and returns, like host.cuh does for the layer kernels. Only the
// cross-entropy reads back (its return value is the loss). Compiled by nvcc and, unchanged, by g++ under the emulator.
// Every op is deterministic: no float atomics, reductions in a fixed order.
#include "runtime.cuh"
#include "qalora_common.h"

#include <algorithm>
#include <vector>

namespace qalora {
namespace QL_BACKEND_NS {
namespace core {
namespace kern {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
// Attention keeps one head row per warp in registers: up to 32·kMaxPerLane elements.
constexpr int kMaxPerLane = 8;
constexpr int kAttnWarps = 4;

QL_DEV float warp_sum(float v) {
  QL_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
QL_DEV float warp_max(float v) {
  QL_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide reduction over kThreads threads; every thread gets the result. `scratch` holds 32 floats.
template <bool MAX>
QL_DEV float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  float r = lane < warps ? scratch[lane] : (MAX ? -INFINITY : 0.f);
  return MAX ? warp_max(r) : warp_sum(r);
}

// ---- GEMM: 64×64 tile per block, k-slices of 16 through shared memory, a 4×4 micro-tile per thread. ----------
constexpr int BM = 64, BN = 64, BK = 16;
__global__ void QL_LAUNCH_BOUNDS(256, 2) gemm_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                                     float* __restrict__ c, int64_t m, int64_t n, int64_t k,
                                                     bool trans_a, bool trans_b, bool accumulate) {
  __shared__ float as[BK][BM + 4];
  __shared__ float bs[BK][BN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = (int64_t)blockIdx.y * BM, col0 = (int64_t)blockIdx.x * BN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += BK) {
    // Loads walk the contiguous dimension of each layout across consecutive threads (coalesced).
    for (int idx = threadIdx.x; idx < BM * BK; idx += kThreads) {
      int kk, i;
      if (trans_a) { i = idx % BM; kk = idx / BM; } else { kk = idx % BK; i = idx / BK; }
      const int64_t gi = row0 + i, gk = k0 + kk;
      as[kk][i] = (gi < m && gk < k) ? (trans_a ? a[gk * m + gi] : a[gi * k + gk]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += kThreads) {
      int kk, j;
      if (trans_b) { kk = idx % BK; j = idx / BK; } else { j = idx % BN; kk = idx / BN; }
      const int64_t gj = col0 + j, gk = k0 + kk;
      bs[kk][j] = (gj < n && gk < k) ? (trans_b ? b[gj * k + gk] : b[gk * n + gj]) : 0.f;
    }
    __syncthreads();
    QL_UNROLL
    for (int kk = 0; kk < BK; kk++) {
      float ra[4], rb[4];
      QL_UNROLL
      for (int r = 0; r < 4; r++) ra[r] = as[kk][ty + 16 * r];
      QL_UNROLL
      for (int s = 0; s < 4; s++) rb[s] = bs[kk][tx + 16 * s];
      QL_UNROLL
      for (int r = 0; r < 4; r++)
        QL_UNROLL
        for (int s = 0; s < 4; s++) acc[r][s] = fmaf(ra[r], rb[s], acc[r][s]);
    }
    __syncthreads();
  }
  QL_UNROLL
  for (int r = 0; r < 4; r++) {
    const int64_t gi = row0 + ty + 16 * r;
    if (gi >= m) continue;
    QL_UNROLL
    for (int s = 0; s < 4; s++) {
      const int64_t gj = col0 + tx + 16 * s;
      if (gj < n) c[gi * n + gj] = accumulate ? c[gi * n + gj] + acc[r][s] : acc[r][s];
    }
  }
}

// ---- GEMV: C[m, n] = A·Bᵀ for a few rows (decode's float classifier, m ≤ kGemvRows): a warp per column j reads
// row j of B once, coalesced, for all m rows of A; a 64×64 tile would leave all but m of its 64 rows idle.
constexpr int kGemvRows = 8, kGemvWarps = 8;
__global__ void QL_LAUNCH_BOUNDS(kGemvWarps * 32, 2) gemv_nt_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                                                   float* __restrict__ c, int64_t m, int64_t n, int64_t k,
                                                                   bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t j = (int64_t)blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  if (j >= n) return;  // whole warps leave together
  const float* w = b + j * k;
  float acc[kGemvRows] = {};
  for (int64_t kk = lane; kk < k; kk += 32) {
    const float wv = w[kk];
    QL_UNROLL
    for (int r = 0; r < kGemvRows; r++)
      if (r < m) acc[r] = fmaf(a[r * k + kk], wv, acc[r]);
  }
  QL_UNROLL
  for (int r = 0; r < kGemvRows; r++) {
    if (r >= m) break;
    const float s = warp_sum(acc[r]);
    if (lane == 0) c[r * n + j] = accumulate ? c[r * n + j] + s : s;
  }
}

// ---- Embedding ----------------------------------------------------------------------------------------------
__global__ void embedding_forward_kernel(const float* __restrict__ table, const int32_t* __restrict__ ids,
                                         float* __restrict__ out, int64_t n, int64_t vocab, int64_t dim) {
  const int64_t row = blockIdx.x;
  const int32_t id = ids[row];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[row * dim + c] = valid ? table[(int64_t)id * dim + c] : 0.f;
}

// One thread per column walks the ids in order: a row hit twice sums in the CPU's order, with no atomics.
__global__ void embedding_backward_kernel(const int32_t* __restrict__ ids, const float* __restrict__ dout,
                                          float* __restrict__ dtable, int64_t n, int64_t vocab, int64_t dim) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  for (int64_t i = 0; i < n; i++) {
    const int32_t id = ids[i];
    if (id >= 0 && id < vocab) dtable[(int64_t)id * dim + c] += dout[i * dim + c];
  }
}

// ---- RMSNorm: one block per row. ----------------------------------------------------------------------------
__global__ void QL_LAUNCH_BOUNDS(256, 1) rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                                float* __restrict__ y, float* __restrict__ rstd,
                                                                int64_t dim, float eps) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  const float s = rsqrtf(block_reduce<false>(ss, scratch) / (float)dim + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = s;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) y[blockIdx.x * dim + i] = w[i] * xr[i] * s;
}

__global__ void QL_LAUNCH_BOUNDS(256, 1) rmsnorm_backward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                                 const float* __restrict__ rstd, const float* __restrict__ dy,
                                                                 float* __restrict__ dx, int64_t dim) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * dim;
  const float* dyr = dy + blockIdx.x * dim;
  float d = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) d = fmaf(dyr[i] * w[i], xr[i], d);
  const float s = rstd[blockIdx.x];
  const float c = block_reduce<false>(d, scratch) * s * s * s / (float)dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dx[blockIdx.x * dim + i] = s * w[i] * dyr[i] - c * xr[i];
}

// The hardware sin/cos (exact enough on [-π, π]); under the emulator glibc's __sinf collides with its twin.
#ifdef QALORA_EMU
QL_DEV float fast_sin(float x) { return sinf(x); }
QL_DEV float fast_cos(float x) { return cosf(x); }
#else
QL_DEV float fast_sin(float x) { return __sinf(x); }
QL_DEV float fast_cos(float x) { return __cosf(x); }
#endif

// ---- RoPE: one thread per rotated pair; sign −1 is the inverse rotation (the gradient). ------------------------
__global__ void rope_kernel(float* __restrict__ x, const int32_t* __restrict__ pos, int64_t rows, int64_t heads,
                            int64_t head_dim, float theta, bool rotate_half, float sign) {
  const int64_t half = head_dim / 2;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * heads * half) return;
  const int64_t j = idx % half, rh = idx / half, r = rh / heads;
  const float inv_freq = 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
  // The CPU's angle, reduced to [-π, π] in double so the fast sin/cos (no local-memory slow path) stay exact.
  const double ang = (double)((float)pos[r] * inv_freq), two_pi = 6.283185307179586;
  const float red = (float)(ang - two_pi * rint(ang / two_pi));
  const float cs = fast_cos(red), sn = sign * fast_sin(red);
  float* v = x + rh * head_dim;
  const int64_t i0 = rotate_half ? j : 2 * j, i1 = rotate_half ? j + half : 2 * j + 1;
  const float v0 = v[i0], v1 = v[i1];
  v[i0] = v0 * cs - v1 * sn;
  v[i1] = v0 * sn + v1 * cs;
}

// ---- Attention: one warp per (batch, head, query row), kAttnWarps query rows per block; the head row lives in
// registers spread over the lanes, scores are warp reductions, softmax is online (one pass over the keys). -------
struct AttnShape {
  int64_t batch, tq, tk, heads, kv_heads, head_dim;
  float scale;
};

QL_DEV void load_row(float (&r)[kMaxPerLane], const float* p, int64_t hd, int lane) {
  QL_UNROLL
  for (int e = 0; e < kMaxPerLane; e++) r[e] = lane + 32 * e < hd ? p[lane + 32 * e] : 0.f;
}
QL_DEV float dot_row(const float (&r)[kMaxPerLane], const float* p, int64_t hd, int lane) {
  float d = 0.f;
  QL_UNROLL
  for (int e = 0; e < kMaxPerLane; e++)
    if (lane + 32 * e < hd) d = fmaf(r[e], p[lane + 32 * e], d);
  return warp_sum(d);
}

// Forward in the FlashAttention style: a block takes kFlashQueries query rows of one (batch, head) and walks the
// keys they see in tiles of kFlashKeys, staged with V in shared memory and shared by all its rows; each row keeps
// a running max, sum and output (online softmax), so no score matrix exists. Scoring gives one key to each lane
// (K rows padded by one float: lane j reads row j without bank conflicts); the output gives each lane head dims
// lane, lane + 32, …, with the probabilities broadcast by shuffles. Decode (few rows, long caches) splits the keys
// across blocks as well (split-K): each split writes its unnormalized output and (max, sum), and
// attention_combine_kernel merges them.
constexpr int kFlashWarps = 4, kFlashRowsPerWarp = 2, kFlashQueries = kFlashWarps * kFlashRowsPerWarp, kFlashKeys = 32;

// KV: float, or uint16_t fp16 bits (the device KV cache).
template <class KV>
struct FlashParams {
  const float* q;
  const KV* k;
  const KV* v;
  float* out;
  float* lse;
  float* part_o;   // [splits, rows, head_dim] when splits > 1 (rows = batch·tq·heads)
  float* part_ml;  // [splits, rows, 2]: max and sum
  AttnShape sh;
  int64_t splits, keys_per_split;
};

QL_DEV float kv_value(float x) { return x; }
QL_DEV float kv_value(uint16_t h) { return qalora::f16_to_f32(h); }

template <class KV>
QL_DEV float q_at(const FlashParams<KV>& p, int64_t b, int64_t t, int64_t h, int64_t d) {
  return p.q[(b * p.sh.tq + t) * p.sh.heads * p.sh.head_dim + h * p.sh.head_dim + d];
}

inline size_t flash_smem_bytes(int64_t hd) { return (size_t)(kFlashQueries * hd + kFlashKeys * (hd + 1) + kFlashKeys * hd) * sizeof(float); }

template <class KV>
__global__ void QL_LAUNCH_BOUNDS(kFlashWarps * 32, 2) attention_forward_kernel(FlashParams<KV> p) {
  QL_DYN_SMEM(float, smem);
  const AttnShape& sh = p.sh;
  const int64_t hd = sh.head_dim, kstride = hd + 1;
  float* qs = smem;                       // [kFlashQueries][hd], pre-scaled
  float* ks = qs + kFlashQueries * hd;    // [kFlashKeys][hd + 1]
  float* vs = ks + kFlashKeys * kstride;  // [kFlashKeys][hd]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t qblocks = (sh.tq + kFlashQueries - 1) / kFlashQueries;
  const int64_t qb = blockIdx.x % qblocks, split = blockIdx.x / qblocks;
  const int64_t h = blockIdx.y, b = blockIdx.z, kvh = h / (sh.heads / sh.kv_heads);
  const int64_t t0 = qb * kFlashQueries, offset = sh.tk - sh.tq, qrow = sh.heads * hd, krow = sh.kv_heads * hd;
  const int64_t t_last = ql::tmin<int64_t>(t0 + kFlashQueries, sh.tq) - 1;
  const int64_t s_begin = split * p.keys_per_split, s_end = ql::tmin<int64_t>(s_begin + p.keys_per_split, t_last + offset + 1);
  for (int64_t i = threadIdx.x; i < kFlashQueries * hd; i += blockDim.x) {
    const int64_t t = t0 + i / hd;
    qs[i] = t < sh.tq ? q_at(p, b, t, h, i % hd) * sh.scale : 0.f;
  }
  float m[kFlashRowsPerWarp], l[kFlashRowsPerWarp], o[kFlashRowsPerWarp][kMaxPerLane];
  QL_UNROLL
  for (int r = 0; r < kFlashRowsPerWarp; r++) {
    m[r] = -INFINITY, l[r] = 0.f;
    QL_UNROLL
    for (int e = 0; e < kMaxPerLane; e++) o[r][e] = 0.f;
  }
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kFlashKeys) {
    __syncthreads();  // the previous tile is consumed (and, the first time, the q rows are stored)
    for (int64_t i = threadIdx.x; i < kFlashKeys * hd; i += blockDim.x) {
      const int64_t j = i / hd, d = i % hd, s = s0 + j;
      const bool in = s < s_end;
      const int64_t at = (b * sh.tk + s) * krow + kvh * hd + d;
      ks[j * kstride + d] = in ? kv_value(p.k[at]) : 0.f;
      vs[j * hd + d] = in ? kv_value(p.v[at]) : 0.f;
    }
    __syncthreads();
    QL_UNROLL
    for (int r = 0; r < kFlashRowsPerWarp; r++) {
      const int64_t t = t0 + warp * kFlashRowsPerWarp + r;
      if (t >= sh.tq) continue;  // warp-uniform
      const int64_t s = s0 + lane;
      float score = -INFINITY;
      if (s < s_end && s <= t + offset) {
        const float* qr = qs + (warp * kFlashRowsPerWarp + r) * hd;
        const float* kr = ks + lane * kstride;
        float d = 0.f;
        for (int64_t e = 0; e < hd; e++) d = fmaf(qr[e], kr[e], d);
        score = d;
      }
      const float tile_max = warp_max(score);
      if (tile_max == -INFINITY) continue;  // this row sees no key of the tile (warp-uniform)
      const float nm = fmaxf(m[r], tile_max), pj = expf(score - nm), rescale = expf(m[r] - nm);
      l[r] = l[r] * rescale + warp_sum(pj);
      QL_UNROLL
      for (int e = 0; e < kMaxPerLane; e++) o[r][e] *= rescale;
      for (int j = 0; j < kFlashKeys; j++) {
        const float pb = __shfl_sync(kFull, pj, j);
        QL_UNROLL
        for (int e = 0; e < kMaxPerLane; e++)
          if (lane + 32 * e < hd) o[r][e] = fmaf(pb, vs[j * hd + lane + 32 * e], o[r][e]);
      }
      m[r] = nm;
    }
  }
  QL_UNROLL
  for (int r = 0; r < kFlashRowsPerWarp; r++) {
    const int64_t t = t0 + warp * kFlashRowsPerWarp + r;
    if (t >= sh.tq) continue;
    const int64_t row = (b * sh.tq + t) * sh.heads + h;  // the (query, head) row of lse
    if (p.splits == 1) {
      const float inv = 1.0f / l[r];
      float* orow = p.out + (b * sh.tq + t) * qrow + h * hd;
      QL_UNROLL
      for (int e = 0; e < kMaxPerLane; e++)
        if (lane + 32 * e < hd) orow[lane + 32 * e] = o[r][e] * inv;
      if (lane == 0) p.lse[row] = m[r] + logf(l[r]);
    } else {
      const int64_t rows = sh.batch * sh.tq * sh.heads;
      float* orow = p.part_o + (split * rows + row) * hd;
      QL_UNROLL
      for (int e = 0; e < kMaxPerLane; e++)
        if (lane + 32 * e < hd) orow[lane + 32 * e] = o[r][e];
      if (lane == 0) p.part_ml[(split * rows + row) * 2] = m[r], p.part_ml[(split * rows + row) * 2 + 1] = l[r];
    }
  }
}

// Merges the splits of a row: weights exp(m_s − M); a split that saw no key has m = −∞ and weighs nothing.
template <class KV>
__global__ void QL_LAUNCH_BOUNDS(128, 4) attention_combine_kernel(FlashParams<KV> p) {
  const AttnShape& sh = p.sh;
  const int lane = threadIdx.x & 31;
  const int64_t rows = sh.batch * sh.tq * sh.heads, row = (int64_t)blockIdx.x * kAttnWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t hd = sh.head_dim;
  float mx = -INFINITY;
  for (int64_t s = 0; s < p.splits; s++) mx = fmaxf(mx, p.part_ml[(s * rows + row) * 2]);
  float sum = 0.f, o[kMaxPerLane] = {};
  for (int64_t s = 0; s < p.splits; s++) {
    const float ms = p.part_ml[(s * rows + row) * 2];
    if (ms == -INFINITY) continue;
    const float w = expf(ms - mx);
    sum = fmaf(p.part_ml[(s * rows + row) * 2 + 1], w, sum);
    QL_UNROLL
    for (int e = 0; e < kMaxPerLane; e++)
      if (lane + 32 * e < hd) o[e] = fmaf(p.part_o[(s * rows + row) * hd + lane + 32 * e], w, o[e]);
  }
  const int64_t h = row % sh.heads, bt = row / sh.heads;  // bt = b·tq + t
  float* orow = p.out + bt * sh.heads * hd + h * hd;
  const float inv = 1.0f / sum;
  QL_UNROLL
  for (int e = 0; e < kMaxPerLane; e++)
    if (lane + 32 * e < hd) orow[lane + 32 * e] = o[e] * inv;
  if (lane == 0) p.lse[row] = mx + logf(sum);
}

// D[row, h] = dout · out, the softmax-backward correction, once per query row.
__global__ void QL_LAUNCH_BOUNDS(128, 4) attention_delta_kernel(const float* __restrict__ out, const float* __restrict__ dout,
                                                                float* __restrict__ delta, int64_t rows_heads, int64_t hd) {
  const int lane = threadIdx.x & 31;
  const int64_t task = (int64_t)blockIdx.x * kAttnWarps + (threadIdx.x >> 5);
  if (task >= rows_heads) return;
  float r[kMaxPerLane];
  load_row(r, dout + task * hd, hd, lane);
  const float d = dot_row(r, out + task * hd, hd, lane);
  if (lane == 0) delta[task] = d;
}

// dq: one warp per query row, over the keys it sees.
__global__ void QL_LAUNCH_BOUNDS(128, 4) attention_dq_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                                             const float* __restrict__ v, const float* __restrict__ lse,
                                                             const float* __restrict__ dout, const float* __restrict__ delta,
                                                             float* __restrict__ dq, AttnShape sh) {
  const int lane = threadIdx.x & 31;
  const int64_t task = (int64_t)blockIdx.x * kAttnWarps + (threadIdx.x >> 5);
  if (task >= sh.batch * sh.heads * sh.tq) return;
  const int64_t t = task % sh.tq, h = (task / sh.tq) % sh.heads, b = task / (sh.tq * sh.heads);
  const int64_t hd = sh.head_dim, kvh = h / (sh.heads / sh.kv_heads), last = t + sh.tk - sh.tq;
  const int64_t qs = sh.heads * hd, ks = sh.kv_heads * hd, row = b * sh.tq + t;
  float qr[kMaxPerLane], dor[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + row * qs + h * hd, hd, lane);
  load_row(dor, dout + row * qs + h * hd, hd, lane);
  const float l = lse[row * sh.heads + h], D = delta[row * sh.heads + h];
  const float* kb = k + b * sh.tk * ks + kvh * hd;
  const float* vb = v + b * sh.tk * ks + kvh * hd;
  for (int64_t s = 0; s <= last; s++) {
    const float p = expf(dot_row(qr, kb + s * ks, hd, lane) * sh.scale - l);
    const float ds = p * (dot_row(dor, vb + s * ks, hd, lane) - D) * sh.scale;
    QL_UNROLL
    for (int e = 0; e < kMaxPerLane; e++)
      if (lane + 32 * e < hd) acc[e] = fmaf(ds, kb[s * ks + lane + 32 * e], acc[e]);
  }
  float* dqr = dq + row * qs + h * hd;
  QL_UNROLL
  for (int e = 0; e < kMaxPerLane; e++)
    if (lane + 32 * e < hd) dqr[lane + 32 * e] = acc[e];
}

// dk, dv: one warp per (batch, kv head, key), summing over the query heads of its group and the queries that see
// it; each key row has one owner, so no atomics.
__global__ void QL_LAUNCH_BOUNDS(128, 4) attention_dkv_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                                              const float* __restrict__ v, const float* __restrict__ lse,
                                                              const float* __restrict__ dout, const float* __restrict__ delta,
                                                              float* __restrict__ dk, float* __restrict__ dv, AttnShape sh) {
  const int lane = threadIdx.x & 31;
  const int64_t task = (int64_t)blockIdx.x * kAttnWarps + (threadIdx.x >> 5);
  if (task >= sh.batch * sh.kv_heads * sh.tk) return;
  const int64_t s = task % sh.tk, kvh = (task / sh.tk) % sh.kv_heads, b = task / (sh.tk * sh.kv_heads);
  const int64_t hd = sh.head_dim, group = sh.heads / sh.kv_heads, offset = sh.tk - sh.tq;
  const int64_t qs = sh.heads * hd, ks = sh.kv_heads * hd;
  float kr[kMaxPerLane], vr[kMaxPerLane], dka[kMaxPerLane] = {}, dva[kMaxPerLane] = {};
  load_row(kr, k + (b * sh.tk + s) * ks + kvh * hd, hd, lane);
  load_row(vr, v + (b * sh.tk + s) * ks + kvh * hd, hd, lane);
  const int64_t t0 = s - offset > 0 ? s - offset : 0;  // first query that sees key s
  for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
    for (int64_t t = t0; t < sh.tq; t++) {
      const int64_t row = b * sh.tq + t;
      const float* qv = q + row * qs + h * hd;
      const float* dov = dout + row * qs + h * hd;
      const float p = expf(dot_row(kr, qv, hd, lane) * sh.scale - lse[row * sh.heads + h]);
      const float ds = p * (dot_row(vr, dov, hd, lane) - delta[row * sh.heads + h]) * sh.scale;
      QL_UNROLL
      for (int e = 0; e < kMaxPerLane; e++)
        if (lane + 32 * e < hd) {
          dva[e] = fmaf(p, dov[lane + 32 * e], dva[e]);
          dka[e] = fmaf(ds, qv[lane + 32 * e], dka[e]);
        }
    }
  }
  float* dkr = dk + (b * sh.tk + s) * ks + kvh * hd;
  float* dvr = dv + (b * sh.tk + s) * ks + kvh * hd;
  QL_UNROLL
  for (int e = 0; e < kMaxPerLane; e++)
    if (lane + 32 * e < hd) {
      dkr[lane + 32 * e] = dka[e];
      dvr[lane + 32 * e] = dva[e];
    }
}

// ---- Element-wise --------------------------------------------------------------------------------------------
QL_DEV float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__global__ void swiglu_forward_kernel(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out,
                                      int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

__global__ void swiglu_backward_kernel(const float* __restrict__ gate, const float* __restrict__ up,
                                       const float* __restrict__ dout, float* __restrict__ dgate, float* __restrict__ dup,
                                       int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i], sg = sigmoid(g), d = dout[i];
    dup[i] = d * g * sg;
    dgate[i] = d * up[i] * sg * (1.0f + g * (1.0f - sg));
  }
}

__global__ void add_inplace_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) y[i] += x[i];
}

// Storage casts through the scalar rules of qalora_common.h, the ones the CPU uses: bit for bit the same.
template <bool BF16>
__global__ void to_half_kernel(const float* __restrict__ x, uint16_t* __restrict__ y, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = BF16 ? qalora::f32_to_bf16(x[i]) : qalora::f32_to_f16(x[i]);
}
template <bool BF16>
__global__ void from_half_kernel(const uint16_t* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = BF16 ? qalora::bf16_to_f32(x[i]) : qalora::f16_to_f32(x[i]);
}

// ---- Softmax cross-entropy: one block per row; per-row losses summed on the host in row order. ------------------
__global__ void QL_LAUNCH_BOUNDS(256, 1) cross_entropy_kernel(const float* logits, const int32_t* __restrict__ targets,
                                                              int64_t vocab, float scale, float* dlogits,
                                                              float* __restrict__ loss) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int32_t target = targets[row];
  // dlogits may be logits (the model writes the gradient over the logits): every read of a row happens before
  // the last block_reduce's barrier, every write after it; hence no __restrict__ on these two.
  const float* x = logits + row * vocab;
  float* g = dlogits ? dlogits + row * vocab : nullptr;
  if (target < 0 || target >= vocab) {  // ignored position: the whole block leaves together
    if (g)
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) g[i] = 0.f;
    if (threadIdx.x == 0) loss[row] = 0.f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = block_reduce<true>(mx, scratch);
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(x[i] - mx);
  sum = block_reduce<false>(sum, scratch);
  if (threadIdx.x == 0) loss[row] = mx + logf(sum) - x[target];
  if (g) {
    const float inv = 1.0f / sum;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
      g[i] = scale * (expf(x[i] - mx) * inv - (i == target ? 1.0f : 0.0f));
  }
}

// ---- Optimizer ---------------------------------------------------------------------------------------------------
// AdamW in float64 per element, as optim.cpp (nvcc may contract a multiply-add that g++ does not: the emulator's
// result is the CPU's bit for bit, a GPU's may differ in the last bit of a parameter).
__global__ void adamw_update_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, int64_t n, double lr, double beta1, double beta2, double eps,
                                    double decay, double grad_scale, double bc1, double bc2) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double gi = (double)g[i] * grad_scale;
    const double mi = beta1 * m[i] + (1 - beta1) * gi;
    const double vi = beta2 * v[i] + (1 - beta2) * gi * gi;
    m[i] = (float)mi;
    v[i] = (float)vi;
    p[i] = (float)(p[i] * decay - (lr * (mi / bc1)) / (sqrt(vi / bc2) + eps));
  }
}

// Σ x (or Σ x²) in two fixed-order passes: kSumBlocks·kThreads strided partial sums, then one block adds them in
// a tree.
constexpr int kSumBlocks = 256;
__global__ void sum_partial_kernel(const float* __restrict__ x, int64_t n, bool squares, double* __restrict__ partial) {
  __shared__ double part[kThreads];
  double s = 0;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += (int64_t)kSumBlocks * kThreads)
    s += squares ? (double)x[i] * x[i] : (double)x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}
__global__ void sum_final_kernel(double* __restrict__ partial) {
  __shared__ double part[kSumBlocks];
  part[threadIdx.x] = partial[threadIdx.x];
  __syncthreads();
  for (int w = kSumBlocks / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[0] = part[0];
}

}  // namespace kern

using kern::kThreads;

inline unsigned grid_for(int64_t n) {
  const unsigned g = ql::ceil_div(n, kThreads);
  return g < 65535u * 16 ? g : 65535u * 16;  // grid-stride loops cover the rest
}

void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b,
          bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (m <= kern::kGemvRows && trans_b && !trans_a) {
    QL_LAUNCH(kern::gemv_nt_kernel, ql::ceil_div(n, kern::kGemvWarps), kern::kGemvWarps * 32, 0, 0)(a, b, c, m, n, k, accumulate);
    ql::launched("core::gemv_nt_kernel");
    return;
  }
  QL_LAUNCH(kern::gemm_kernel, dim3(ql::ceil_div(n, kern::BN), ql::ceil_div(m, kern::BM)), kThreads, 0, 0)(
      a, b, c, m, n, k, trans_a, trans_b, accumulate);
  ql::launched("core::gemm_kernel");
}

void embedding_forward(const float* table, const int32_t* ids, float* out, int64_t n, int64_t vocab, int64_t dim) {
  if (n <= 0 || dim <= 0) return;
  QL_LAUNCH(kern::embedding_forward_kernel, (unsigned)n, dim < kThreads ? 32 * (unsigned)ql::ceil_div(dim, 32) : kThreads, 0, 0)(
      table, ids, out, n, vocab, dim);
  ql::launched("core::embedding_forward_kernel");
}

void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t n, int64_t vocab, int64_t dim) {
  if (n <= 0 || dim <= 0) return;
  QL_LAUNCH(kern::embedding_backward_kernel, ql::ceil_div(dim, kThreads), kThreads, 0, 0)(ids, dout, dtable, n, vocab, dim);
  ql::launched("core::embedding_backward_kernel");
}

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t dim, float eps) {
  if (rows <= 0) return;
  QL_LAUNCH(kern::rmsnorm_forward_kernel, (unsigned)rows, kThreads, 0, 0)(x, w, y, rstd, dim, eps);
  ql::launched("core::rmsnorm_forward_kernel");
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int64_t rows,
                      int64_t dim) {
  if (rows <= 0) return;
  QL_LAUNCH(kern::rmsnorm_backward_kernel, (unsigned)rows, kThreads, 0, 0)(x, w, rstd, dy, dx, dim);
  ql::launched("core::rmsnorm_backward_kernel");
}

namespace {
void rope(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta, bool rotate_half,
          float sign) {
  const int64_t pairs = rows * heads * (head_dim / 2);
  if (pairs <= 0) return;
  QL_LAUNCH(kern::rope_kernel, ql::ceil_div(pairs, kThreads), kThreads, 0, 0)(x, pos, rows, heads, head_dim, theta,
                                                                             rotate_half, sign);
  ql::launched("core::rope_kernel");
}

kern::AttnShape attn_shape(int64_t batch, int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (head_dim > 32 * kern::kMaxPerLane)
    throw std::invalid_argument("core attention on the GPU supports headDim ≤ " + std::to_string(32 * kern::kMaxPerLane) +
                                ", got " + std::to_string(head_dim));
  if (kv_heads <= 0 || heads % kv_heads != 0)
    throw std::invalid_argument("core attention: heads (" + std::to_string(heads) + ") must be a multiple of kvHeads (" +
                                std::to_string(kv_heads) + ")");
  return kern::AttnShape{batch, tq, tk, heads, kv_heads, head_dim, 1.0f / sqrtf((float)head_dim)};
}
constexpr unsigned kAttnThreads = 32 * kern::kAttnWarps;
}  // namespace

void rope_forward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                  bool rotate_half) {
  rope(x, pos, rows, heads, head_dim, theta, rotate_half, 1.0f);
}
void rope_backward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                   bool rotate_half) {
  rope(dx, pos, rows, heads, head_dim, theta, rotate_half, -1.0f);
}

// Enough blocks to fill a large GPU: decode's few query rows get their keys split until there are about this many.
constexpr int64_t kAttnTargetBlocks = 256;

namespace {
template <class KV>
void flash_attention(const float* q, const KV* k, const KV* v, float* out, float* lse, int64_t batch, int64_t tq,
                     int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const kern::AttnShape sh = attn_shape(batch, tq, tk, heads, kv_heads, head_dim);
  const int64_t rows = batch * heads * tq;
  if (rows <= 0) return;
  const int64_t qblocks = ql::ceil_div(tq, kern::kFlashQueries), blocks = qblocks * heads * batch;
  // Split the keys only where the rows alone leave the GPU idle, and never below 4 tiles a split.
  int64_t splits = std::min<int64_t>(ql::ceil_div(kAttnTargetBlocks, blocks), ql::ceil_div(tk, 4 * kern::kFlashKeys));
  splits = std::max<int64_t>(splits, 1);
  const int64_t per_split = ql::ceil_div(ql::ceil_div(tk, splits), kern::kFlashKeys) * kern::kFlashKeys;
  splits = ql::ceil_div(tk, per_split);
  ql::DeviceBuffer<float> part_o(splits > 1 ? splits * rows * head_dim : 0), part_ml(splits > 1 ? splits * rows * 2 : 0);
  const kern::FlashParams<KV> p{q, k, v, out, lse, part_o.ptr, part_ml.ptr, sh, splits, per_split};
  const size_t smem = kern::flash_smem_bytes(head_dim);
  auto kernel = kern::attention_forward_kernel<KV>;
  if (smem > 48 * 1024)
    ql::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "cudaFuncSetAttribute(attention_forward_kernel)");
  QL_LAUNCH(kernel, dim3((unsigned)(qblocks * splits), (unsigned)heads, (unsigned)batch), kern::kFlashWarps * 32, smem, 0)(p);
  ql::launched("core::attention_forward_kernel");
  if (splits > 1) {
    auto combine = kern::attention_combine_kernel<KV>;
    QL_LAUNCH(combine, ql::ceil_div(rows, kern::kAttnWarps), kAttnThreads, 0, 0)(p);
    ql::launched("core::attention_combine_kernel");
  }
}
}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  flash_attention(q, k, v, out, lse, batch, tq, tk, heads, kv_heads, head_dim);
}
void attention_forward_kv16(const float* q, const uint16_t* k, const uint16_t* v, float* out, float* lse, int64_t batch,
                            int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  flash_attention(q, k, v, out, lse, batch, tq, tk, heads, kv_heads, head_dim);
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                        const float* dout, float* dq, float* dk, float* dv, int64_t batch, int64_t tq, int64_t tk,
                        int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const kern::AttnShape sh = attn_shape(batch, tq, tk, heads, kv_heads, head_dim);
  const int64_t qn = batch * tq * heads, kn = batch * tk * kv_heads;
  if (qn <= 0 || kn <= 0) return;
  ql::DeviceBuffer<float> delta(qn);
  QL_LAUNCH(kern::attention_delta_kernel, ql::ceil_div(qn, kern::kAttnWarps), kAttnThreads, 0, 0)(out, dout, delta.ptr,
                                                                                                   qn, head_dim);
  ql::launched("core::attention_delta_kernel");
  QL_LAUNCH(kern::attention_dq_kernel, ql::ceil_div(qn, kern::kAttnWarps), kAttnThreads, 0, 0)(
      q, k, v, lse, dout, delta.ptr, dq, sh);
  ql::launched("core::attention_dq_kernel");
  QL_LAUNCH(kern::attention_dkv_kernel, ql::ceil_div(kn, kern::kAttnWarps), kAttnThreads, 0, 0)(
      q, k, v, lse, dout, delta.ptr, dk, dv, sh);
  ql::launched("core::attention_dkv_kernel");
}

void swiglu_forward(const float* gate, const float* up, float* out, int64_t n) {
  if (n <= 0) return;
  QL_LAUNCH(kern::swiglu_forward_kernel, grid_for(n), kThreads, 0, 0)(gate, up, out, n);
  ql::launched("core::swiglu_forward_kernel");
}

void swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  if (n <= 0) return;
  QL_LAUNCH(kern::swiglu_backward_kernel, grid_for(n), kThreads, 0, 0)(gate, up, dout, dgate, dup, n);
  ql::launched("core::swiglu_backward_kernel");
}

namespace {
// Σ of n floats into one double on the device, in a fixed order (sum_squares's two passes); reads back 8 bytes.
double device_sum(const float* x, int64_t n, bool squares) {
  ql::DeviceBuffer<double> partial(kern::kSumBlocks);
  QL_LAUNCH(kern::sum_partial_kernel, kern::kSumBlocks, kThreads, 0, 0)(x, n, squares, partial.ptr);
  ql::launched("core::sum_partial_kernel");
  QL_LAUNCH(kern::sum_final_kernel, 1, kern::kSumBlocks, 0, 0)(partial.ptr);
  ql::launched("core::sum_final_kernel");
  double total = 0;
  ql::check(cudaMemcpy(&total, partial.ptr, sizeof(double), cudaMemcpyDeviceToHost), "core::sum readback");
  return total;
}

// The loss is the return value, so this op reads back: the rows' losses summed on the device, 8 bytes. It is the
// one wait of a training chunk.
double cross_entropy(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float scale, float* dlogits) {
  if (n <= 0) return 0.0;
  ql::DeviceBuffer<float> loss(n);
  QL_LAUNCH(kern::cross_entropy_kernel, (unsigned)n, kThreads, 0, 0)(logits, targets, vocab, scale, dlogits, loss.ptr);
  ql::launched("core::cross_entropy_kernel");
  return device_sum(loss.ptr, n, false);
}
}  // namespace

double cross_entropy_forward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab) {
  return cross_entropy(logits, targets, n, vocab, 0.f, nullptr);
}
double cross_entropy_backward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float scale,
                              float* dlogits) {
  return cross_entropy(logits, targets, n, vocab, scale, dlogits);
}

void add_inplace(float* y, const float* x, int64_t n) {
  if (n <= 0) return;
  QL_LAUNCH(kern::add_inplace_kernel, grid_for(n), kThreads, 0, 0)(y, x, n);
  ql::launched("core::add_inplace_kernel");
}

namespace {
// One element-wise cast launch; `name` is what a launch error reports.
template <class From, class To>
void cast(void (*kernel)(const From*, To*, int64_t), const char* name, const From* x, To* y, int64_t n) {
  if (n <= 0) return;
  QL_LAUNCH(kernel, grid_for(n), kThreads, 0, 0)(x, y, n);
  ql::launched(name);
}
}  // namespace

void f32_to_f16(const float* x, uint16_t* y, int64_t n) { cast(kern::to_half_kernel<false>, "core::to_half_kernel<fp16>", x, y, n); }
void f16_to_f32(const uint16_t* x, float* y, int64_t n) { cast(kern::from_half_kernel<false>, "core::from_half_kernel<fp16>", x, y, n); }
void f32_to_bf16(const float* x, uint16_t* y, int64_t n) { cast(kern::to_half_kernel<true>, "core::to_half_kernel<bf16>", x, y, n); }
void bf16_to_f32(const uint16_t* x, float* y, int64_t n) { cast(kern::from_half_kernel<true>, "core::from_half_kernel<bf16>", x, y, n); }

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                  double eps, double decay, double grad_scale, double bc1, double bc2) {
  if (n <= 0) return;
  QL_LAUNCH(kern::adamw_update_kernel, grid_for(n), kThreads, 0, 0)(p, g, m, v, n, lr, beta1, beta2, eps, decay, grad_scale, bc1, bc2);
  ql::launched("core::adamw_update_kernel");
}

// Returns the sum, so it reads back 8 bytes (one wait).
double sum_squares(const float* x, int64_t n) {
  return n > 0 ? device_sum(x, n, true) : 0.0;
}

}  // namespace core
}  // namespace QL_BACKEND_NS
}  // namespace qalora
