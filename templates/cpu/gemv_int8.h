// The GEMV with int8 activations (LayerArgs.int8_activations; `--activations int8`): each row of x quantized
// per 32 inputs (act_scale in qalora_common.h), then per block one integer dot of 32 q bytes with 32 x_q bytes
// (vpmaddubsw + vpmaddwd under AVX2) and one multiply-add by α·d. This is what llama.cpp does for decode; it
// spends about a third of the instructions per weight of the fp32 GEMV in layer.h. β·Σx and the adapter stay
// in fp32 with the exact group sums. Only for groups that are whole 32-blocks (FAST); the caller checks.
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

/// Rows of x as int8 per 32-block, bytes in block_byte_input<BITS> order, with each block's scale d and (for
/// the signed 8-bit q) Σ x_q.
struct ActQ8 {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  int64_t in = 0, blocks = 0;
  const int8_t* block(int64_t m, int64_t b) const { return q.data() + m * in + b * 32; }
  float scale(int64_t m, int64_t b) const { return d[(size_t)(m * blocks + b)]; }
};

template <int BITS>
ActQ8 quantize_activations(const float* x, int64_t m, int64_t in) {
  ActQ8 a;
  a.in = in;
  a.blocks = in / 32;
  a.q.resize((size_t)(m * in));
  a.d.resize((size_t)(m * a.blocks));
  a.sum.resize((size_t)(m * a.blocks));
  cpu_rt::parallel_range(m * a.blocks, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const float* src = x + t * 32;  // in is a multiple of 32: block t of the flat rows
      float amax = 0.f;
      for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(src[i]));
      const float d = act_scale(amax), inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < 32; j++) {
        const int v = act_quantize(src[block_byte_input<BITS>(j)], inv);
        a.q[(size_t)(t * 32 + j)] = (int8_t)v;
        sum += v;
      }
      a.d[(size_t)t] = d;
      a.sum[(size_t)t] = sum;
    }
  });
  return a;
}

/// Σ_k β_k·Σx_k over one row's groups: the offset term of every GEMV.
template <class S>
inline float offset_dot(const S* beta, const float* sums, int64_t groups) {
  f8 acc = f8_zero();
  int64_t k = 0;
  for (; k + 8 <= groups; k += 8) acc = f8_fma(f8_scales(beta + k), f8_load(sums + k), acc);
  float r = f8_sum(acc);
  for (; k < groups; k++) r += scale_f32(beta[k]) * sums[k];
  return r;
}

/// y[m0 .. m0+RR, o] with int8 activations: the block's q unpacked once for all RR rows.
template <int BITS, class S, int RR>
void gemv_rows_int8(const LayerArgs& a, const QuantView<S>& w, int64_t o, int64_t m0, const ActQ8& xq,
                    const std::vector<float>& sums, const std::vector<float>& hs, float* y) {
  // Independent accumulators per row so consecutive blocks' multiply-adds do not wait on each other.
  constexpr int P = RR == 1 ? 4 : RR == 2 ? 2 : 1;
  const int64_t blocks = xq.blocks, per_group = w.group / 32;
  const uint32_t* row = w.row(o);
  const S* alpha = w.alpha + o * w.groups;
  f8 acc[RR][P];
  float corr[RR] = {};  // 8 bits: α·d·128·Σx_q, the part of q·x_q the signed q − 128 leaves out
  for (int r = 0; r < RR; r++)
    for (int p = 0; p < P; p++) acc[r][p] = f8_zero();
  int64_t k = -1, left = 0;
  float ak = 0.f;
  auto block = [&](int64_t b, int p) {
    if (left == 0) {
      ak = scale_f32(alpha[++k]);
      left = per_group;
    }
    left--;
    const b32 q = unpack_block_bytes<BITS>(row + b * BITS);
    const f8 av = f8_set1(ak);  // shared by the rows; each row's d is a broadcast load (no shuffle, no scalar op)
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++) {
      const float* d = &xq.d[(size_t)((m0 + r) * blocks + b)];
      const b32 x = b32_load(xq.block(m0 + r, b));
      if constexpr (BITS == 8) {
        acc[r][p] = f8_fma(f8_mul(av, f8_bcast(d)), dot_s8s8(q, x), acc[r][p]);
        corr[r] += ak * *d * (128.f * (float)xq.sum[(size_t)((m0 + r) * blocks + b)]);
      } else {
        acc[r][p] = f8_fma(f8_mul(av, f8_bcast(d)), dot_u8s8(q, x), acc[r][p]);
      }
    }
  };
  int64_t b = 0;
  for (; b + P <= blocks; b += P)
#pragma GCC unroll 4
    for (int p = 0; p < P; p++) block(b + p, p);
  for (; b < blocks; b++) block(b, 0);
  for (int r = 0; r < RR; r++) {
    f8 t = acc[r][0];
    for (int p = 1; p < P; p++) t = f8_add(t, acc[r][p]);
    const float offset = offset_dot(w.beta + o * w.groups, sums.data() + (m0 + r) * w.groups, w.groups);
    float lora = 0.f;
    for (int64_t j = 0; j < a.rank; j++) lora += hs[(m0 + r) * a.rank + j] * a.lora_b[o * a.rank + j];
    y[(m0 + r) * a.out + o] = f8_sum(t) + corr[r] + offset + lora;
  }
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
