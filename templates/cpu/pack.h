// The packed layout 'blocked32' (qalora_common.h) read 32 inputs at a time: one block of BITS words unpacks to
// four 8-lane vectors of q in input order. The GEMV dots them with x directly (no dequantized copy of W); the
// panel packers below turn them into α·q + β for the GEMM engine (gemm.h), transposed for the forward pass
// (B = Ŵᵀ) and as is for the backward pass (B = Ŵ).
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

/// Shifts that bring input 8c+l of a block to bit 0 of lane l: for 2 and 4 bits, of the chunk's one word;
/// for 3 bits, of the word holding its low two bits (`shift`), and the shift that brings its bit 2 (bit i of
/// word 2) to bit 2 in place (`top`: i − 2, except chunk 0 whose word is pre-shifted left by 2: i).
template <int BITS>
struct BlockShifts {
  int32_t shift[4][8], top[4][8];
  constexpr BlockShifts() : shift(), top() {
    const int per = BITS == 3 ? 16 : 32 / BITS, width = BITS == 3 ? 2 : BITS;
    for (int i = 0; i < 32; i++) {
      shift[i / 8][i % 8] = (i % per) * width;
      top[i / 8][i % 8] = i < 8 ? i : i - 2;
    }
  }
};

/// q of the 32 inputs of one block, as four vectors of 8 u32 lanes in input order. Words are broadcast, shifted
/// per lane and masked (8-bit: bytes zero-extended), so no lane shuffles are needed.
template <int BITS>
inline void unpack_block_u32(const uint32_t* blk, u8v v[4]) {
  static constexpr BlockShifts<BITS> lay{};
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) {
    if constexpr (BITS == 8) {
      v[c] = u8_bytes(blk + 2 * c);
    } else if constexpr (BITS == 3) {
      const u8v low = u8_and(u8_shr(u8_bcast(blk + c / 2), u8_setr(lay.shift[c])), 3u);
      const u8v word2 = c == 0 ? u8_shl(u8_bcast(blk + 2), 2) : u8_bcast(blk + 2);
      v[c] = u8_or(low, u8_and(u8_shr(word2, u8_setr(lay.top[c])), 4u));
    } else {
      v[c] = u8_and(u8_shr(u8_bcast(blk + (8 * c) / (32 / BITS)), u8_setr(lay.shift[c])), (1u << BITS) - 1u);
    }
  }
}

/// The same as floats: the GEMV and the panel packers.
template <int BITS>
inline void unpack_block(const uint32_t* blk, f8 q[4]) {
  u8v v[4];
  unpack_block_u32<BITS>(blk, v);
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) q[c] = u8_to_f8(v[c]);
}

/// q of one block as 32 bytes for the integer dot products: 4 bits straight from the block's 16 bytes (low
/// nibbles, then high), 8 bits as stored but signed (q − 128, so that |q| fits the unsigned operand), 2 and 3
/// bits through unpack_block_u32. The bytes are not in input order; block_byte_input says whose each one is.
template <int BITS>
inline b32 unpack_block_bytes(const uint32_t* blk) {
  if constexpr (BITS == 4) {
    return b32_nibbles(blk);
  } else if constexpr (BITS == 8) {
    return b32_flip_sign(b32_load(blk));
  } else {
    u8v v[4];
    unpack_block_u32<BITS>(blk, v);
    return b32_pack(v);
  }
}

/// The input (0..31, within its block) whose q is byte j of unpack_block_bytes<BITS>: activations are quantized
/// into this order, so that byte j of x_q meets byte j of q.
template <int BITS>
constexpr int block_byte_input(int j) {
  if (BITS == 8) return j;
  if (BITS == 4) return 8 * ((j % 16) / 4) + 2 * (j % 4) + j / 16;  // byte j%16 = word j/4's inputs 2·(j%4), +1
  return 8 * ((j % 16) / 4) + 4 * (j / 16) + j % 4;               // packus: v[c] lane 4L + e
}

/// The quantized weight as the packers and the GEMV see it; S is the storage of α and β (float or fp16 bits),
/// read through a(), b() as fp32.
template <class S>
struct QuantView {
  const uint32_t* q;
  const S* alpha;
  const S* beta;
  int64_t in, out, words_per_row, group, groups;
  const uint32_t* row(int64_t o) const { return q + o * words_per_row; }
  float a(int64_t k) const { return scale_f32(alpha[k]); }
  float b(int64_t k) const { return scale_f32(beta[k]); }
};

/// Ŵ[o, i0 .. i0+32) for a block-aligned i0 whose 32 inputs share group g (the group a multiple of 32).
template <int BITS, class S>
inline void dequant_block(const QuantView<S>& w, int64_t o, int64_t i0, int64_t g, f8 v[4]) {
  unpack_block<BITS>(w.row(o) + (i0 >> 5) * BITS, v);
  const f8 a = f8_set1(w.a(o * w.groups + g)), b = f8_set1(w.b(o * w.groups + g));
  for (int c = 0; c < 4; c++) v[c] = f8_fma(v[c], a, b);
}

template <int BITS, class S>
inline float dequant_one(const QuantView<S>& w, int64_t o, int64_t i) {
  const int64_t g = o * w.groups + i / w.group;
  return w.a(g) * (float)unpack_q(w.row(o), i, BITS) + w.b(g);
}

/// The group of each 32-block of a row in turn, from block b0 on, counted without a division per block (FAST
/// layouts: the group a multiple of 32, so a group spans whole blocks).
class BlockGroups {
 public:
  explicit BlockGroups(int64_t group, int64_t b0 = 0) : per_(group / 32), g_(b0 / per_), left_(per_ - b0 % per_) {}
  /// The group of the next block.
  int64_t next() {
    const int64_t g = g_;
    if (--left_ == 0) {
      g_++;
      left_ = per_;
    }
    return g;
  }

 private:
  int64_t per_, g_, left_;
};

/// Walks the 32-blocks of [i0, i0 + n) of a row (i0 a multiple of 32), calling body(i, group of i).
template <class S, class Body>
inline void for_each_block(const QuantView<S>& w, int64_t i0, int64_t n, Body&& body) {
  BlockGroups groups(w.group, i0 / 32);
  for (int64_t i = i0; i < i0 + n; i += 32) body(i, groups.next());
}

/// Nibble J of every lane as a float, 0 … 15 (the top one shifted down alone: no mask needed).
template <int J>
inline f8 nibble_f8(u8v v) {
  if constexpr (J == 7) return u8_to_f8(u8_shr_imm<28>(v));
  else if constexpr (J == 0) return u8_to_f8(u8_and(v, 15u));
  else return u8_to_f8(u8_and(u8_shr_imm<4 * J>(v), 15u));
}

/// out[J·NR ..] ← α·(nibble J of v) + β for the eight nibbles: one word per lane dequantized into eight rows.
template <int... J>
inline void store_nibbles(u8v v, f8 alpha, f8 beta, float* out, std::integer_sequence<int, J...>) {
  (f8_store(out + J * NR, f8_fma(nibble_f8<J>(v), alpha, beta)), ...);
}

/// Ŵ[o .. o+8, i] for i in [i0, i0 + 64t) into dst[(i − i0)·NR + r], 4 bits: each row's eight words (64 inputs)
/// are loaded once and transposed as integers, so word t of all eight rows is one vector and its nibble j is
/// input 8t + j of rows o .. o+7, in the slice's layout: no float transposes, one shift, mask and convert per
/// 8 weights. The same α·q + β per weight as dequant_block, so the panel's bits do not change. Returns the inputs
/// it packed (whole 64-input spans).
template <class S>
inline int64_t pack_rows8_q4(const QuantView<S>& w, int64_t o, int64_t i0, int64_t n, float* dst) {
  const int64_t spans = n / 64;
  BlockGroups groups(w.group, i0 / 32);
  alignas(32) float a8[8], b8[8];
  f8 av = f8_zero(), bv = f8_zero();
  for (int64_t p = 0; p < spans; p++) {
    const int64_t i = i0 + 64 * p;
    u8v words[8];
    for (int r = 0; r < 8; r++) words[r] = u8_load(w.row(o + r) + i / 8);
    u8_transpose8(words);
    for (int t = 0; t < 8; t++) {
      if (t % 4 == 0) {  // a new 32-block: its group's α and β for the eight rows
        const int64_t g = groups.next();
        for (int r = 0; r < 8; r++) {
          a8[r] = w.a((o + r) * w.groups + g);
          b8[r] = w.b((o + r) * w.groups + g);
        }
        av = f8_load(a8);
        bv = f8_load(b8);
      }
      store_nibbles(words[t], av, bv, dst + (64 * p + 8 * t) * NR, std::make_integer_sequence<int, 8>{});
    }
  }
  return 64 * spans;
}

/// Forward: B(k, n) = Ŵ[n, k], so each output row o fills one column of a [kc][NR] slice.
/// FAST (group a multiple of 32) needs k0 and kc to be multiples of 32; the caller's blocking guarantees it.
template <int BITS, bool FAST, class S>
void pack_w_transposed(const void* ctx, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* panel) {
  const QuantView<S>& w = *static_cast<const QuantView<S>*>(ctx);
  for (int64_t j = 0; j < nc; j += NR) {
    float* slice = panel + (j / NR) * kc * NR;
    if constexpr (FAST) {
      // Eight output rows at a time: each dequantizes a block of 32 inputs, and 8×8 transposes turn those
      // rows into the slice's rows of eight consecutive columns (one store each, not 32 scattered floats).
      if (j + NR <= nc) {
        for (int half = 0; half < NR; half += 8) {
          int64_t done = 0;
          if constexpr (BITS == 4) done = pack_rows8_q4(w, n0 + j + half, k0, kc, slice + half);
          // the rest (all of it below 4 bits; a trailing 32-block at 4): a block at a time, through float transposes
          for_each_block(w, k0 + done, kc - done, [&](int64_t i, int64_t g) {
            f8 rows[4][8];
            for (int r = 0; r < 8; r++) {
              f8 v[4];
              dequant_block<BITS>(w, n0 + j + half + r, i, g, v);
              for (int c = 0; c < 4; c++) rows[c][r] = v[c];
            }
            float* dst = slice + (i - k0) * NR + half;
            for (int c = 0; c < 4; c++) {
              f8_transpose8(rows[c]);
              for (int t = 0; t < 8; t++) f8_store(dst + (8 * c + t) * NR, rows[c][t]);
            }
          });
        }
        continue;
      }
    }
    for (int col = 0; col < NR; col++) {
      const int64_t o = n0 + j + col;
      if (j + col >= nc) {
        for (int64_t k = 0; k < kc; k++) slice[k * NR + col] = 0.f;
      } else if constexpr (FAST) {
        for_each_block(w, k0, kc, [&](int64_t i, int64_t g) {
          alignas(32) float tmp[32];
          f8 v[4];
          dequant_block<BITS>(w, o, i, g, v);
          for (int c = 0; c < 4; c++) f8_store(tmp + 8 * c, v[c]);
          float* dst = slice + (i - k0) * NR + col;
          for (int t = 0; t < 32; t++) dst[t * NR] = tmp[t];
        });
      } else {
        for (int64_t k = 0; k < kc; k++) slice[k * NR + col] = dequant_one<BITS>(w, o, k0 + k);
      }
    }
  }
}

/// Backward: B(k, n) = Ŵ[k, n], so a row of W fills a row of consecutive slices. FAST needs n0 and nc to be
/// multiples of 32.
template <int BITS, bool FAST, class S>
void pack_w(const void* ctx, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* panel) {
  const QuantView<S>& w = *static_cast<const QuantView<S>*>(ctx);
  const int64_t slice_size = kc * NR;
  for (int64_t k = 0; k < kc; k++) {
    const int64_t o = k0 + k;
    if constexpr (FAST) {
      for_each_block(w, n0, nc, [&](int64_t i, int64_t g) {
        f8 v[4];
        dequant_block<BITS>(w, o, i, g, v);
        float* dst = panel + ((i - n0) / NR) * slice_size + k * NR;
        f8_store(dst, v[0]);
        f8_store(dst + 8, v[1]);
        f8_store(dst + slice_size, v[2]);
        f8_store(dst + slice_size + 8, v[3]);
      });
    } else {
      const int64_t padded = (nc + NR - 1) / NR * NR;
      for (int64_t n = 0; n < padded; n++) {
        panel[(n / NR) * slice_size + k * NR + n % NR] = n < nc ? dequant_one<BITS>(w, o, n0 + n) : 0.f;
      }
    }
  }
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
