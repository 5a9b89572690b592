// The fp32 GEMV for 4-bit weights (the common case: GGUF Q4_0/Q4_1 bases, `bits 4` specs), groups of whole
// 32-blocks. One load takes eight q words — two blocks, 64 inputs —, and nibble j of every lane is one vector
// whose lane l is input 8l + j. x is read in that order: each 64-input span of x is transposed 8×8 once per call
// (transpose_spans), shared by every output row. Nibble j is not shifted down: the mask leaves q·2^(4j), which
// converts exactly, and transpose_spans scales x's row j by 2^(−4j) to match, so q·x rounds the same (powers of
// two commute with rounding; exact for |x| above 2^−102). An 8-weight vector costs a mask and a convert (the top
// nibble: a shift and a convert), and the two blocks' products share a vector that is scaled by their groups' α
// lane-wise (4 + 4 lanes). The other bit widths keep layer.h's block-at-a-time GEMV.
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

/// Rows of x with each whole 64-input span transposed 8×8 and row j scaled by 2^(−4j) for j < 7
/// (xt[64p + 8j + l] = x[64p + 8l + j]·2^(−4j)); a trailing 32-block stays in input order.
inline std::vector<float> transpose_spans(const float* x, int64_t m, int64_t in) {
  static constexpr float kUnshift[8] = {1.f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.f};
  std::vector<float> xt((size_t)(m * in));
  const int64_t spans = in / 64;
  for (int64_t r = 0; r < m; r++) {
    const float* src = x + r * in;
    float* dst = xt.data() + r * in;
    for (int64_t p = 0; p < spans; p++)
      for (int j = 0; j < 8; j++)
        for (int l = 0; l < 8; l++) dst[64 * p + 8 * j + l] = src[64 * p + 8 * l + j] * kUnshift[j];
    std::copy(src + 64 * spans, src + in, dst + 64 * spans);
  }
  return xt;
}

/// Σ_i α_g(i)·q_i·x[r, i] for RR rows of x (as transpose_spans left it) against output rows of W, walked one
/// range of 64-input spans at a time: Acc holds an output row's lane sums between ranges, so the caller may walk
/// the inputs in slices (a slice of x stays in L1 across many output rows) and still get, bit for bit, what one
/// walk over the row gives. β·Σx and the adapter are added by the caller (gemv_store).
template <class S, int RR>
struct Q4Rows {
  static constexpr bool kSlices = true;
  static constexpr int64_t kUnitBytes = 64 * sizeof(float);  // of x, per row
  static constexpr int kRows = RR;
  // From three rows of x on, q is scaled by α once per 8 weights, and each row of x sums its products in one
  // chain: with α applied per span instead, a row's products need two chains to hide their latency, and two
  // chains for three or four rows do not fit the 16 registers (measured: half the FMA rate at four rows).
  static constexpr bool kScaleQ = RR >= 3;
  // Output rows walked together: each load of x feeds both, and there are twice the chains in flight. Two rows
  // of x would need more registers than there are.
  static constexpr int kOutRows = RR == 2 ? 1 : 2;
  struct Acc {
    f8 v[RR];
  };
  const QuantView<S>& w;
  const float* x[RR];
  int64_t in;
  bool first_pass;  // rows m0 = 0 on: the pass that prefetches α and β

  Q4Rows(const QuantView<S>& view, const float* xt, int64_t inputs, int64_t m0)
      : w(view), in(inputs), first_pass(m0 == 0) {
    for (int r = 0; r < RR; r++) x[r] = xt + (m0 + r) * in;
  }
  int64_t units() const { return in / 64; }  // whole 64-input spans (two 32-blocks); an odd block is finish()'s

  void begin(int64_t o, Acc& acc) const {
    for (int r = 0; r < RR; r++) acc.v[r] = f8_zero();
    if (!first_pass) return;
    // α and β of a row 4 ahead: streams of their own, read once per row, that q's prefetch misses
    const int64_t ahead = std::min(o + 4, w.out - 1) * w.groups;
    for (int64_t byte = 0; byte < w.groups * (int64_t)sizeof(S); byte += 64) {
      prefetch(reinterpret_cast<const char*>(w.alpha + ahead) + byte);
      prefetch(reinterpret_cast<const char*>(w.beta + ahead) + byte);
    }
  }

  /// Spans [p0, p1) of output rows o .. o+NW into out[0 .. NW).
  template <int NW = 1>
  void add(int64_t o, int64_t p0, int64_t p1, Acc* out) const {
    Acc acc[NW];  // local copies stay in registers (f8 may alias x, so the caller's could not); by element,
    // since a struct copy may become `rep movsq`
    for (int n = 0; n < NW; n++)
      for (int r = 0; r < RR; r++) acc[n].v[r] = out[n].v[r];
    // Two product chains per row of x for one or two rows (the chain's latency, not the ports, bounds one).
    constexpr int P = 2;
    const uint32_t* row[NW];
    const S* alpha[NW];
    for (int n = 0; n < NW; n++) {
      row[n] = w.row(o + n);
      alpha[n] = w.alpha + (o + n) * w.groups;
    }
    // fp32 α of groups [first, first + 8), refilled as the blocks move on
    alignas(32) float ab[NW][8];
    int64_t first = -8;
    BlockGroups groups(w.group, 2 * p0);
    for (int64_t p = p0; p < p1; p++) {
      if ((p & 1) == 0)
        for (int n = 0; n < NW; n++) prefetch(row[n] + 8 * p + kPrefetchWords);
      const int64_t g0 = groups.next(), g1 = groups.next();
      if (g1 >= first + 8) {
        first = g0;
        for (int n = 0; n < NW; n++) {
          if (w.groups - first >= 8) f8_store(ab[n], f8_scales(alpha[n] + first));
          else for (int64_t k = first; k < w.groups; k++) ab[n][k - first] = scale_f32(alpha[n][k]);
        }
      }
      u8v v[NW];
      f8 av[NW];
      for (int n = 0; n < NW; n++) {
        v[n] = u8_load(row[n] + 8 * p);
        av[n] = f8_halves(ab[n] + (g0 - first), ab[n] + (g1 - first));
      }
      f8 t[NW][P][RR];
      auto lane = [&](auto j_) {
        constexpr int j = decltype(j_)::value;
        // q·2^(4j) in place (an int32 below 2^28: exact as a float); the top nibble is shifted, its bit 31 would sign it
        auto q = [&](int n) { return u8_to_f8(j < 7 ? u8_and(v[n], 15u << (4 * j)) : u8_shr_imm<28>(v[n])); };
        if constexpr (kScaleQ) {
          f8 qa[NW];
          for (int n = 0; n < NW; n++) qa[n] = f8_mul(q(n), av[n]);
          for (int r = 0; r < RR; r++) {
            const f8 xv = f8_load(x[r] + 64 * p + 8 * j);
            for (int n = 0; n < NW; n++) acc[n].v[r] = f8_fma(qa[n], xv, acc[n].v[r]);
          }
        } else {
          f8 qn[NW];
          for (int n = 0; n < NW; n++) qn[n] = q(n);
          for (int r = 0; r < RR; r++) {
            const f8 xv = f8_load(x[r] + 64 * p + 8 * j);
            for (int n = 0; n < NW; n++) t[n][j % P][r] = j < P ? f8_mul(qn[n], xv) : f8_fma(qn[n], xv, t[n][j % P][r]);
          }
        }
      };
      lane(std::integral_constant<int, 0>{});
      lane(std::integral_constant<int, 1>{});
      lane(std::integral_constant<int, 2>{});
      lane(std::integral_constant<int, 3>{});
      lane(std::integral_constant<int, 4>{});
      lane(std::integral_constant<int, 5>{});
      lane(std::integral_constant<int, 6>{});
      lane(std::integral_constant<int, 7>{});
      if constexpr (!kScaleQ)
        for (int n = 0; n < NW; n++)
          for (int r = 0; r < RR; r++) acc[n].v[r] = f8_fma(av[n], f8_add(t[n][0][r], t[n][1][r]), acc[n].v[r]);
    }
    for (int n = 0; n < NW; n++)
      for (int r = 0; r < RR; r++) out[n].v[r] = acc[n].v[r];
  }

  /// res[r]: the lane sums reduced, plus the odd last 32-block (in input order).
  void finish(int64_t o, const Acc& acc, float (&res)[RR]) const {
    for (int r = 0; r < RR; r++) res[r] = f8_sum(acc.v[r]);
    const int64_t blocks = in / 32, spans = blocks / 2;
    if (blocks % 2 == 0) return;
    const int64_t i = 64 * spans;
    const float ak = scale_f32(w.alpha[o * w.groups + BlockGroups(w.group, 2 * spans).next()]);
    f8 q[4];
    unpack_block<4>(w.row(o) + 8 * spans, q);
    for (int r = 0; r < RR; r++) {
      f8 t = f8_mul(q[0], f8_load(x[r] + i));
      for (int c = 1; c < 4; c++) t = f8_fma(q[c], f8_load(x[r] + i + 8 * c), t);
      res[r] += ak * f8_sum(t);
    }
  }
};

}  // namespace qalora::cpu_isa::QL_ISA_NS
