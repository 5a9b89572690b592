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

/// Σ_i α_g(i)·q_i·x[r, i] for rows m0 .. m0+RR of x (as transpose_spans left it) against output row o; β·Σx
/// and the adapter are added by the caller (gemv_store).
template <class S, int RR>
void gemv_rows_q4(const QuantView<S>& w, int64_t o, int64_t m0, const float* xt, int64_t in, float (&res)[RR]) {
  // Two product chains per row for one or two rows (the chain's latency, not the ports, bounds a single one).
  constexpr int P = RR <= 2 ? 2 : 1;
  const uint32_t* row = w.row(o);
  const S* alpha = w.alpha + o * w.groups;
  const int64_t blocks = in / 32, spans = blocks / 2;
  const float* x[RR];
  for (int r = 0; r < RR; r++) x[r] = xt + (m0 + r) * in;
  if (m0 == 0) {  // α and β of a row 4 ahead: streams of their own, read once per row, that q's prefetch misses
    const int64_t ahead = std::min(o + 4, w.out - 1) * w.groups;
    for (int64_t byte = 0; byte < w.groups * (int64_t)sizeof(S); byte += 64) {
      prefetch(reinterpret_cast<const char*>(w.alpha + ahead) + byte);
      prefetch(reinterpret_cast<const char*>(w.beta + ahead) + byte);
    }
  }
  f8 acc[RR];
  for (int r = 0; r < RR; r++) acc[r] = f8_zero();
  // fp32 α of groups [first, first + 8), refilled as the blocks move on
  alignas(32) float ab[8];
  int64_t first = -8;
  BlockGroups groups(w.group);
  for (int64_t p = 0; p < spans; p++) {
    if ((p & 1) == 0) prefetch(row + 8 * p + kPrefetchWords);
    const int64_t g0 = groups.next(), g1 = groups.next();
    if (g1 >= first + 8) {
      first = g0;
      if (w.groups - first >= 8) f8_store(ab, f8_scales(alpha + first));
      else for (int64_t k = first; k < w.groups; k++) ab[k - first] = scale_f32(alpha[k]);
    }
    const u8v v = u8_load(row + 8 * p);
    f8 t[P][RR];
    auto lane = [&](auto j_) {
      constexpr int j = decltype(j_)::value;
      // q·2^(4j) in place (an int32 below 2^28: exact as a float); the top nibble is shifted, its bit 31 would sign it
      const f8 q = u8_to_f8(j < 7 ? u8_and(v, 15u << (4 * j)) : u8_shr_imm<28>(v));
      for (int r = 0; r < RR; r++) {
        const f8 xv = f8_load(x[r] + 64 * p + 8 * j);
        t[j % P][r] = j < P ? f8_mul(q, xv) : f8_fma(q, xv, t[j % P][r]);
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
    const f8 av = f8_halves(ab + (g0 - first), ab + (g1 - first));
    for (int r = 0; r < RR; r++) acc[r] = f8_fma(av, P > 1 ? f8_add(t[0][r], t[P - 1][r]) : t[0][r], acc[r]);
  }
  for (int r = 0; r < RR; r++) res[r] = f8_sum(acc[r]);
  if (blocks % 2) {  // the odd last block, in input order
    const int64_t i = 64 * spans;
    const float ak = scale_f32(alpha[groups.next()]);
    f8 q[4];
    unpack_block<4>(row + 8 * spans, q);
    for (int r = 0; r < RR; r++) {
      f8 t = f8_mul(q[0], f8_load(x[r] + i));
      for (int c = 1; c < 4; c++) t = f8_fma(q[c], f8_load(x[r] + i + 8 * c), t);
      res[r] += ak * f8_sum(t);
    }
  }
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
