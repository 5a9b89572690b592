// Definitions shared by every backend (CPU, CUDA, CUDA emulation) and mirrored by the TypeScript reference
// (runtime/reference/): the kernel argument block, the packed layout of q, the min-max rule with its stored
// scales, the dropout hash and scalar fp16/bf16 conversions. Anything that must agree bit for bit across backends lives here, once.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__) || defined(QALORA_EMU)
#define QL_HD __host__ __device__ __forceinline__
#else
#define QL_HD inline
#endif

namespace qalora {

// One layer call. Pointers are to the backend's memory (host for cpu, device for cuda/emu kernels; the
// cuda/emu host entry points take host pointers and stage them).
struct LayerArgs {
  const uint32_t* qweight;  // [out, words_per_row(in, bits)]  packed q, layout below
  const void* alpha;        // [out, in/g]  float, or fp16 bits (uint16_t) for `scales fp16` specializations
  const void* beta;         // [out, in/g]  same storage as alpha
  const float* lora_a;      // [rank, in/g]   (may be null when rank == 0)
  const float* lora_b;      // [out, rank]
  int64_t m;                // rows of x
  int64_t in;               // input features
  int64_t out;              // output features
  int64_t rank;             // 0: no adapter
  float scale;              // s = alpha / rank
  float pool_scale;         // c: p = c * sum_{i in group} x_i   (mean 1/g, sum 1, peft (in/g)/g)
  float dropout;            // probability of dropping, applied only when training != 0
  int32_t training;
  uint64_t seed;            // dropout stream
  int32_t int8_activations; // CPU GEMV only (m <= the spec's GEMV rows, group % 32 == 0): x quantized per 32
                            // inputs to int8 (act_scale below) and dotted with q in integers; 0: fp32, exact
};

// The entry points of one specialization (docs/ARCHITECTURE.md), declared in namespace NS — e.g.
// qalora::cpu::b4_g32_fp32_mean. Every backend defines them; the addon and the CPU dispatcher declare them here.
// alpha, beta and beta_out point at the specialization's scale storage (float, or uint16_t fp16 bits): one
// signature for both, so the addon's kernel table stays one type; the addon checks the arrays' element type.
#define QL_DECLARE_LAYER_KERNELS(NS)                                                                            \
  namespace NS {                                                                                              \
  void quantize(const float* w, int64_t out, int64_t in, uint32_t* qweight, void* alpha, void* beta);         \
  void dequantize(const uint32_t* qweight, const void* alpha, const void* beta, int64_t out, int64_t in,      \
                  float* w);                                                                                  \
  void forward(const ::qalora::LayerArgs& a, const void* x, void* y);                                         \
  void backward(const ::qalora::LayerArgs& a, const void* x, const void* dy, void* dx, float* grad_a,         \
                float* grad_b);                                                                               \
  void merge(const ::qalora::LayerArgs& a, void* beta_out);                                                   \
  }

// ---- Packed layout 'blocked32' -------------------------------------------------------------------------
// Each row of W is split into blocks of 32 inputs (the last block zero-padded); a block takes exactly `bits`
// u32 words, so a row takes words_per_row = ceil(in/32) * bits words and nothing is wasted, 3-bit included.
//  bits 2, 4, 8: word j of a block holds inputs [j*(32/bits), (j+1)*(32/bits)), input i at bit (i % (32/bits))*bits.
//  bits 3:       words 0 and 1 hold the low 2 bits of inputs 0..15 and 16..31 (2-bit packed as above),
//                word 2 holds bit 2 of input i at bit i.
QL_HD int64_t words_per_row(int64_t in, int bits) { return ((in + 31) / 32) * bits; }

QL_HD uint32_t unpack_q(const uint32_t* row, int64_t i, int bits) {
  const uint32_t* blk = row + (i >> 5) * bits;
  const int j = (int)(i & 31);
  if (bits == 3) {
    uint32_t lo = (blk[j >> 4] >> ((j & 15) * 2)) & 3u;
    uint32_t hi = (blk[2] >> j) & 1u;
    return lo | (hi << 2);
  }
  const int per = 32 / bits;
  return (blk[j / per] >> ((j % per) * bits)) & ((1u << bits) - 1u);
}

// Callers zero the row first.
QL_HD void pack_q(uint32_t* row, int64_t i, int bits, uint32_t q) {
  uint32_t* blk = row + (i >> 5) * bits;
  const int j = (int)(i & 31);
  if (bits == 3) {
    blk[j >> 4] |= (q & 3u) << ((j & 15) * 2);
    blk[2] |= ((q >> 2) & 1u) << j;
    return;
  }
  const int per = 32 / bits;
  blk[j / per] |= (q & ((1u << bits) - 1u)) << ((j % per) * bits);
}

// ---- Dropout --------------------------------------------------------------------------------------------
// keep(seed, index) with index = row * width + column of the tensor dropout applies to: the pooled p [m, in/g]
// for 'mean' and 'sum' (dropout after pooling, as the reference code), x [m, in] for 'peft' (before pooling).
// Kept values are scaled by 1/(1 - p).
QL_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
QL_HD bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  const uint64_t u = splitmix64(seed ^ splitmix64(index));
  return (float)(u >> 40) * (1.0f / 16777216.0f) >= p;
}

// ---- fp16 / bf16 storage (raw uint16 bits; round to nearest even on store) --------------------------------
QL_HD float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
QL_HD uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
QL_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
QL_HD uint16_t f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);              // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);             // overflow (incl. rounding up) -> inf
  if (a < 0x38800000u) {                                              // subnormal or zero in fp16
    if (a < 0x33000000u) return (uint16_t)sign;                       // below half the smallest subnormal
    const uint32_t shift = 126 - (a >> 23);                           // 14..24
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = a + 0x0fffu + ((a >> 13) & 1u) - (112u << 23);
  return (uint16_t)(sign | (r >> 13));
}

// ---- Scale storage and quantization (min-max, round to nearest even, fp32 arithmetic) ----------------------
// S, the storage of α and β, is float or uint16_t (fp16 bits, `scales fp16`). Per (row, group):
//   α = (max - min) / qmax (1 when max == min), β = min, both in fp32, step by step;
//   stored: α̂ = S(α), β̂ = S(β) — for fp16 each rounded to nearest even on its own (β = min does not depend on
//     α, so rounding one "after" the other changes nothing); an α that would round to 0 (a range below 2^-25·qmax)
//     is stored as the smallest fp16 subnormal so that the division below stays finite;
//   q = clamp(rint((w - β̂) / α̂), 0, qmax) against the *stored* values widened to fp32.
// Quantizing against α̂, β̂ (not the fp32 α, β) is what keeps the error bounded: inside the grid it is at most
// α̂/2, as with fp32 scales; against the fp32 values it would grow with q, by up to qmax·|α̂ - α| (an eighth of
// a step at 8 bits). What rounding adds is only at the ends of the range, where clamping meets the moved grid:
// |w - (α̂·q + β̂)| ≤ α̂/2 + |β̂ - β| + qmax·|α̂ - α| ≤ α̂/2 + 2^-11·(|β| + qmax·α). fp16 holds |α|, |β| up to
// 65504: larger weights become inf (fp16 scales are for weights a fp16 GGUF file could hold).
// For S = float every stored value is the fp32 one, bit for bit what this rule was before fp16 scales.
QL_HD float scale_to_f32(float s) { return s; }
QL_HD float scale_to_f32(uint16_t s) { return f16_to_f32(s); }
QL_HD void store_scale(float v, float* dst) { *dst = v; }
QL_HD void store_scale(float v, uint16_t* dst) { *dst = f32_to_f16(v); }

template <class S>
struct GroupScales {
  S alpha, beta;  // what is stored
  float a, b;     // the stored values widened: what q is computed against and dequantization uses
};
template <class S>
QL_HD GroupScales<S> group_scales(float mn, float mx, float qmax) {
  GroupScales<S> g;
  store_scale(mx == mn ? 1.0f : (mx - mn) / qmax, &g.alpha);
  store_scale(mn, &g.beta);
  g.a = scale_to_f32(g.alpha);
  if (g.a == 0.0f) {  // only fp16 underflows here: keep the step positive
    store_scale(0x1p-24f, &g.alpha);
    g.a = scale_to_f32(g.alpha);
  }
  g.b = scale_to_f32(g.beta);
  return g;
}
QL_HD float quantize_one(float w, float a, float b, float qmax) {
  return fminf(qmax, fmaxf(0.0f, rintf((w - b) / a)));
}

// ---- int8 activations (LayerArgs.int8_activations) -----------------------------------------------------------
// Per block of 32 inputs of a row of x: d = max|x| / 127 and x_q = clamp(rint(x · (1/d)), -127, 127) (0 when
// d == 0), all fp32, the way llama.cpp quantizes activations for its integer dot products (Q8_0/Q8_1). The
// group sums Σx of the β term stay exact fp32: only α·Σ q·x is approximated, by α·d·Σ q·x_q.
QL_HD float act_scale(float amax) { return amax / 127.0f; }
QL_HD int act_quantize(float x, float inv_d) { return (int)fminf(127.0f, fmaxf(-127.0f, rintf(x * inv_d))); }

}  // namespace qalora
