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
/// the signed 8-bit q) Σ x_q. Block-major ([block][row]): the rows of a GEMV pass sit side by side, 32 bytes and
/// 4 bytes apart, so one pointer and constant offsets reach all of them.
struct ActQ8 {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  int64_t rows = 0, blocks = 0;
};

template <int BITS>
ActQ8 quantize_activations(const float* x, int64_t m, int64_t in) {
  ActQ8 a;
  a.rows = m;
  a.blocks = in / 32;
  a.q.resize((size_t)(m * in));
  a.d.resize((size_t)(m * a.blocks));
  a.sum.resize((size_t)(m * a.blocks));
  cpu_rt::parallel_range(m * a.blocks, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t r = t / a.blocks, blk = t % a.blocks, at = blk * m + r;
      const float* src = x + r * in + blk * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(src[i]));
      const float d = act_scale(amax), inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < 32; j++) {
        const int v = act_quantize(src[block_byte_input<BITS>(j)], inv);
        a.q[(size_t)(at * 32 + j)] = (int8_t)v;
        sum += v;
      }
      a.d[(size_t)at] = d;
      a.sum[(size_t)at] = sum;
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

/// β·Σx of output o for one row of x. The GEMVs take it before their q loop, so its loads (β is a stream of its
/// own) overlap that loop instead of ending the row on a wait.
template <class S>
inline float row_offset(const QuantView<S>& w, int64_t o, int64_t row, const std::vector<float>& sums) {
  return offset_dot(w.beta + o * w.groups, sums.data() + row * w.groups, w.groups);
}

/// y[row, o] = dot + β·Σx + the adapter's term: how a row ends in both GEMVs (this one and layer.h's fp32 one).
template <class S>
inline void gemv_store(const LayerArgs& a, const QuantView<S>& w, int64_t o, int64_t row, float dot, float offset,
                       const std::vector<float>& hs, float* y) {
  float lora = 0.f;
  for (int64_t j = 0; j < a.rank; j++) lora += hs[row * a.rank + j] * a.lora_b[o * a.rank + j];
  y[row * a.out + o] = dot + offset + lora;
}

/// How far ahead of the blocks in hand the GEMV prefetches q (u32 words).
constexpr int64_t kPrefetchWords = 512;

/// One block of q against RR rows: x points at the first row's 32 bytes, d and xsum at its scale and Σ x_q.
template <int BITS, int RR>
__attribute__((always_inline)) inline void int8_block(const uint32_t* qblk, const int8_t* x, const float* d,
                                                      const int32_t* xsum, float alpha, f8 (&acc)[RR],
                                                      float (&corr)[RR]) {
  const b32 q = unpack_block_bytes<BITS>(qblk);
  const f8 av = f8_set1(alpha);  // shared by the rows; each row's d is a broadcast load
#pragma GCC unroll 8
  for (int r = 0; r < RR; r++) {
    const f8 s = f8_mul(av, f8_bcast(d + r));
    if constexpr (BITS == 8) {
      acc[r] = f8_fma(s, dot_s8s8(q, b32_load(x + 32 * r)), acc[r]);
      corr[r] += alpha * d[r] * (128.f * (float)xsum[r]);  // the part of q·x_q that q − 128 leaves out
    } else {
      acc[r] = f8_fma(s, dot_u8s8(q, b32_load(x + 32 * r)), acc[r]);
    }
  }
}

/// Σ α·d·(q·x_q) for RR rows of x (quantized) against output rows of W, each block's q unpacked once for all
/// RR rows; a walker like Q4Rows (gemv_q4.h) that the GEMV takes a whole row at a time: x is block-major, so
/// all RR rows stream from L2 as one sequence, and walking it in slices measured 12 % slower at 8 rows.
template <int BITS, class S, int RR>
struct Int8Rows {
  static constexpr bool kSlices = false;
  static constexpr int kOutRows = 1;
  static constexpr int kRows = RR;
  // Independent accumulators (P per row) so consecutive blocks' multiply-adds do not wait on each other.
  static constexpr int P = RR == 1 ? 4 : RR == 2 ? 2 : 1;
  struct Acc {
    f8 v[P][RR];
    float corr[RR];
  };
  const QuantView<S>& w;
  const int8_t* x;  // block 0 of row m0; block b is m·32 bytes further
  const float* d;
  const int32_t* xs;
  int64_t blocks, m;

  Int8Rows(const QuantView<S>& view, const ActQ8& xq, int64_t m0)
      : w(view), x(xq.q.data() + m0 * 32), d(xq.d.data() + m0), xs(xq.sum.data() + m0), blocks(xq.blocks),
        m(xq.rows) {}
  int64_t units() const { return blocks; }

  static void copy_acc(const Acc& from, Acc& to) {
    for (int p = 0; p < P; p++)
      for (int r = 0; r < RR; r++) to.v[p][r] = from.v[p][r];
    for (int r = 0; r < RR; r++) to.corr[r] = from.corr[r];
  }

  void begin(int64_t, Acc& acc) const {
    for (int p = 0; p < P; p++)
      for (int r = 0; r < RR; r++) acc.v[p][r] = f8_zero();
    for (int r = 0; r < RR; r++) acc.corr[r] = 0.f;
  }

  /// Blocks [b0, b1) of row o into acc (b0 a multiple of 8).
  template <int NW = 1>
  void add(int64_t o, int64_t b0, int64_t b1, Acc* out) const {
    static_assert(NW == 1, "one output row at a time");
    Acc acc;  // a local copy stays in registers (f8 may alias x, so the caller's could not); copied by element,
    // since a struct copy became `rep movsq`, whose start-up cost showed at ~9 % of a batched pass
    copy_acc(*out, acc);
    const uint32_t* row = w.row(o);
    const S* alpha = w.alpha + o * w.groups;
    auto at = [&](int64_t b, float ab, f8 (&acc_p)[RR]) {
      int8_block<BITS, RR>(row + b * BITS, x + b * m * 32, d + b * m, xs + b * m, ab, acc_p, acc.corr);
    };
    // α of each block in turn (a group may span several)
    BlockGroups groups(w.group, b0);
    auto next_alpha = [&] { return scale_f32(alpha[groups.next()]); };
    int64_t b = b0;
    float ab[8];
    for (; b + 8 <= b1; b += 8) {
      // q 2 KB ahead of the blocks in hand (into the next row at the end of this one: a chunk's rows are
      // contiguous): +10–15 % GEMV bandwidth on this machine over the hardware prefetcher alone.
      for (int64_t w16 = 0; w16 < 8 * BITS; w16 += 16) prefetch(row + b * BITS + kPrefetchWords + w16);
      for (int j = 0; j < 8; j++) ab[j] = next_alpha();
      for (int j = 0; j < 8; j += P) {
        at(b + j, ab[j], acc.v[0]);
        if constexpr (P > 1) at(b + j + 1, ab[j + 1], acc.v[1]);
        if constexpr (P > 2) {
          at(b + j + 2, ab[j + 2], acc.v[2]);
          at(b + j + 3, ab[j + 3], acc.v[3]);
        }
      }
    }
    for (; b < b1; b++) at(b, next_alpha(), acc.v[0]);
    copy_acc(acc, *out);
  }

  void finish(int64_t, const Acc& acc, float (&res)[RR]) const {
    for (int r = 0; r < RR; r++) {
      f8 t = acc.v[0][r];
      for (int p = 1; p < P; p++) t = f8_add(t, acc.v[p][r]);
      res[r] = f8_sum(t) + acc.corr[r];
    }
  }
};

}  // namespace qalora::cpu_isa::QL_ISA_NS
