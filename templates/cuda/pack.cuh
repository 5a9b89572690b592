// Quantize (min-max, one warp per (row, group)), pack ('blocked32', one warp per (row, 32-input block), the
// words assembled with shuffles/ballot), dequantize, and the unpack helper the GEMV and GEMM kernels share.
#pragma once

namespace qalora {
namespace QL_BACKEND_NS {
namespace kern {

constexpr uint32_t kFullMask = 0xffffffffu;
constexpr uint32_t kMagic23 = 0x4B000000u;  // float 2^23: OR a small integer into its mantissa to convert it

// q (< 2^23) as float: one lop3 ((v & mask) | 2^23) and one subtraction, no int→float conversion unit.
template <uint32_t MASK>
QL_DEV float q_to_float(uint32_t shifted) {
  return ql::bit_cast_dev<float>(ql::lop3<0xEA>(shifted, MASK, kMagic23)) - 8388608.0f;
}

// The 8 values of chunk c (inputs 8c..8c+7) of one 32-input block whose BITS words start at blk.
template <int BITS>
QL_DEV void unpack8(const uint32_t* blk, int c, float (&q)[8]) {
  if constexpr (BITS == 4) {
    const uint32_t w = blk[c];
    QL_UNROLL for (int e = 0; e < 8; e++) q[e] = q_to_float<0xFu>(w >> (4 * e));
  } else if constexpr (BITS == 2) {
    const uint32_t w = blk[c >> 1] >> ((c & 1) * 16);
    QL_UNROLL for (int e = 0; e < 8; e++) q[e] = q_to_float<0x3u>(w >> (2 * e));
  } else if constexpr (BITS == 8) {
    const uint32_t w0 = blk[2 * c], w1 = blk[2 * c + 1];
    QL_UNROLL for (int e = 0; e < 4; e++) {
      q[e] = q_to_float<0xFFu>(w0 >> (8 * e));
      q[e + 4] = q_to_float<0xFFu>(w1 >> (8 * e));
    }
  } else {
    static_assert(BITS == 3, "bits must be 2, 3, 4 or 8");
    const uint32_t lo = blk[c >> 1] >> ((c & 1) * 16), hi = blk[2] >> (8 * c);
    QL_UNROLL for (int e = 0; e < 8; e++) {
      q[e] = q_to_float<0x7u>(((lo >> (2 * e)) & 3u) | (((hi >> e) & 1u) << 2));
    }
  }
}

// α and β per (row, group) by the rule of qalora_common.h (group_scales), stored as C::scale.
template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) quantize_stats_kernel(const float* __restrict__ w, int64_t out, int64_t in,
                                                               typename C::scale* __restrict__ alpha,
                                                               typename C::scale* __restrict__ beta) {
  constexpr int G = C::group;
  constexpr float qmax = (float)((1 << C::bits) - 1);
  const int lane = threadIdx.x & 31;
  const int64_t L = in / G;
  const int64_t gw = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (gw >= out * L) return;  // whole warps leave together
  const float* row = w + (gw / L) * in + (gw % L) * G;
  float mn = INFINITY, mx = -INFINITY;
  for (int j = lane; j < G; j += 32) {
    const float v = row[j];
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  QL_UNROLL for (int off = 16; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  }
  if (lane == 0) {
    const GroupScales<typename C::scale> gs = group_scales<typename C::scale>(mn, mx, qmax);
    alpha[gw] = gs.alpha;
    beta[gw] = gs.beta;
  }
}

template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) pack_kernel(const float* __restrict__ w, int64_t out, int64_t in,
                                                     const typename C::scale* __restrict__ alpha,
                                                     const typename C::scale* __restrict__ beta,
                                                     uint32_t* __restrict__ qweight) {
  constexpr int G = C::group, BITS = C::bits;
  constexpr float qmax = (float)((1 << BITS) - 1);
  const int lane = threadIdx.x & 31;
  const int64_t nb = (in + 31) / 32;
  const int64_t gw = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (gw >= out * nb) return;
  const int64_t o = gw / nb, b = gw % nb, i = b * 32 + lane, L = in / G;
  uint32_t q = 0;  // padding inputs of the last block stay 0
  if (i < in) {
    // against the stored (possibly fp16-rounded) scales, as qalora_common.h prescribes
    q = (uint32_t)quantize_one(w[o * in + i], scale_to_f32(alpha[o * L + i / G]), scale_to_f32(beta[o * L + i / G]), qmax);
  }
  uint32_t* words = qweight + o * words_per_row(in, BITS) + b * BITS;
  if constexpr (BITS == 3) {
    uint32_t low = (q & 3u) << ((lane & 15) * 2);
    QL_UNROLL for (int off = 1; off < 16; off <<= 1) low |= __shfl_xor_sync(kFullMask, low, off);
    const uint32_t high = __ballot_sync(kFullMask, (q >> 2) & 1u);
    if ((lane & 15) == 0) words[lane >> 4] = low;
    if (lane == 0) words[2] = high;
  } else {
    constexpr int per = 32 / BITS;
    uint32_t v = q << ((lane % per) * BITS);
    QL_UNROLL for (int off = 1; off < per; off <<= 1) v |= __shfl_xor_sync(kFullMask, v, off);
    if (lane % per == 0) words[lane / per] = v;
  }
}

template <class C>
__global__ void QL_LAUNCH_BOUNDS(256, 1) dequantize_kernel(const uint32_t* __restrict__ qweight,
                                                           const typename C::scale* __restrict__ alpha,
                                                           const typename C::scale* __restrict__ beta, int64_t out,
                                                           int64_t in, float* __restrict__ w) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= out * in) return;
  const int64_t o = idx / in, i = idx % in, k = o * (in / C::group) + i / C::group;
  const float q = (float)unpack_q(qweight + o * words_per_row(in, C::bits), i, C::bits);
  w[idx] = fmaf(scale_to_f32(alpha[k]), q, scale_to_f32(beta[k]));
}

}  // namespace kern
}  // namespace QL_BACKEND_NS
}  // namespace qalora
