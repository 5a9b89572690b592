// The QA-LoRA layer kernels on the CPU: quantize, dequantize, forward, backward and merge. The code is
// instantiated per (BITS, FAST = group is a multiple of 32): those two decide the inner loops. The rest of a
// specialization's constants (group, dtype, pooling, blocking) arrive as a constexpr SpecConsts from its
// generated entry points, so a spec with many specializations compiles each inner loop once.
// Forward for few rows is a dequantize-free GEMV (per row o and group k: y += α·Σq·x + β·Σx, the group sums
// Σx shared with the adapter's pooled input, so the LoRA path costs no second pass over x); for many rows it
// is the blocked GEMM of gemm.h over dequantized panels. Backward: dx = dy·Ŵ through the same engine plus
// the rank-sized LoRA products, the dropout mask recomputed from the shared hash, never stored.
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

enum class Pool { mean, sum, peft };
enum class DType { fp32, fp16, bf16 };

struct SpecConsts {
  int64_t group;
  DType dtype;
  Pool pool;
  Blocking blocking;
  int64_t gemv_max_rows;
};

struct Dropout {
  bool on;
  float p, keep_scale;
  uint64_t seed;
  explicit Dropout(const LayerArgs& a)
      : on(a.training != 0 && a.dropout > 0.f), p(a.dropout), keep_scale(1.f / (1.f - a.dropout)), seed(a.seed) {}
  float factor(uint64_t index) const { return dropout_keep(seed, index, p) ? keep_scale : 0.f; }
};

/// Activations of n elements as fp32: a view for fp32, a converted copy for fp16/bf16.
struct InF32 {
  const float* p;
  std::vector<float> buf;
  InF32(DType t, const void* src, int64_t n) {
    if (t == DType::fp32) {
      p = static_cast<const float*>(src);
      return;
    }
    buf.resize((size_t)n);
    const uint16_t* s = static_cast<const uint16_t*>(src);
    cpu_rt::parallel_range(n, 1 << 16, [&](int64_t b, int64_t e) {
      if (t == DType::fp16) to_f32(Fp16{}, s + b, buf.data() + b, e - b);
      else to_f32(Bf16{}, s + b, buf.data() + b, e - b);
    });
    p = buf.data();
  }
};

/// An fp32 result that lands in the activation dtype on finish() (fp32 results are written in place).
struct OutF32 {
  DType t;
  void* dst;
  int64_t n;
  float* p;
  std::vector<float> buf;
  OutF32(DType type, void* d, int64_t count) : t(type), dst(d), n(count) {
    if (t == DType::fp32) {
      p = static_cast<float*>(d);
    } else {
      buf.resize((size_t)count);
      p = buf.data();
    }
  }
  void finish() {
    if (t == DType::fp32) return;
    uint16_t* d = static_cast<uint16_t*>(dst);
    cpu_rt::parallel_range(n, 1 << 16, [&](int64_t b, int64_t e) {
      if (t == DType::fp16) from_f32(Fp16{}, p + b, d + b, e - b);
      else from_f32(Bf16{}, p + b, d + b, e - b);
    });
  }
};

/// S: the storage of α and β (float, or uint16_t fp16 bits for `scales fp16`).
template <int BITS, bool FAST, class S>
struct QuantLayer {
  static constexpr int kGemvRowsPerPass = 4;
  /// Output rows a GEMV pass walks together, and the bytes of x a slice of its inputs may take (L1 is 32 KB).
  static constexpr int64_t kGemvTileRows = 16;
  static constexpr int64_t kGemvSliceBytes = 16 << 10;
  using View = QuantView<S>;

  static View view(const SpecConsts& s, const LayerArgs& a) {
    return {a.qweight, static_cast<const S*>(a.alpha), static_cast<const S*>(a.beta), a.in, a.out,
            words_per_row(a.in, BITS), s.group, a.in / s.group};
  }

  // ---- quantize / dequantize ------------------------------------------------------------------------------
  static void quantize(const SpecConsts& s, const float* w, int64_t out, int64_t in, uint32_t* qweight,
                       S* alpha, S* beta) {
    const int64_t group = s.group, groups = in / group, wpr = words_per_row(in, BITS);
    const float qmax = (float)((1 << BITS) - 1);
    cpu_rt::parallel_range(out, 8, [&](int64_t ob, int64_t oe) {
      for (int64_t o = ob; o < oe; o++) {
        uint32_t* row = qweight + o * wpr;
        std::fill(row, row + wpr, 0u);
        for (int64_t k = 0; k < groups; k++) {
          const float* src = w + o * in + k * group;
          float mn = src[0], mx = src[0];
          for (int64_t i = 1; i < group; i++) {
            mn = std::min(mn, src[i]);
            mx = std::max(mx, src[i]);
          }
          // The rule of qalora_common.h (stored scales, q against them): every backend produces these bits.
          const GroupScales<S> gs = group_scales<S>(mn, mx, qmax);
          alpha[o * groups + k] = gs.alpha;
          beta[o * groups + k] = gs.beta;
          for (int64_t i = 0; i < group; i++)
            pack_q(row, k * group + i, BITS, (uint32_t)quantize_one(src[i], gs.a, gs.b, qmax));
        }
      }
    });
  }

  static void dequantize(const SpecConsts& s, const uint32_t* qweight, const S* alpha, const S* beta,
                         int64_t out, int64_t in, float* w) {
    const View v{qweight, alpha, beta, in, out, words_per_row(in, BITS), s.group, in / s.group};
    cpu_rt::parallel_range(out, 8, [&](int64_t ob, int64_t oe) {
      for (int64_t o = ob; o < oe; o++) {
        float* dst = w + o * in;
        if constexpr (FAST) {
          for_each_block(v, 0, in, [&](int64_t i, int64_t g) {
            f8 blk[4];
            dequant_block<BITS>(v, o, i, g, blk);
            for (int c = 0; c < 4; c++) f8_store(dst + i + 8 * c, blk[c]);
          });
        } else {
          for (int64_t i = 0; i < in; i++) dst[i] = dequant_one<BITS>(v, o, i);
        }
      }
    });
  }

  // ---- pooling --------------------------------------------------------------------------------------------
  /// sums[m, k] = Σ_{i∈k} x[m, i], accumulated in fp32.
  static std::vector<float> group_sums(int64_t group, const float* xf, int64_t m, int64_t in) {
    const int64_t groups = in / group;
    std::vector<float> sums((size_t)(m * groups));
    cpu_rt::parallel_range(m * groups, 256, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; t++) {
        const float* src = xf + (t / groups) * in + (t % groups) * group;
        if constexpr (FAST) {
          f8 acc = f8_zero();
          for (int64_t i = 0; i < group; i += 8) acc = f8_add(acc, f8_load(src + i));
          sums[t] = f8_sum(acc);
        } else {
          float sum = 0.f;
          for (int64_t i = 0; i < group; i++) sum += src[i];
          sums[t] = sum;
        }
      }
    });
    return sums;
  }

  /// p [m, L]: drop(c·Σx) for mean/sum (dropout after pooling), c·Σ drop(x) for peft (before pooling).
  static std::vector<float> pooled(const SpecConsts& s, const LayerArgs& a, const float* xf,
                                   const std::vector<float>& sums) {
    const int64_t group = s.group, groups = a.in / group;
    const Dropout drop(a);
    std::vector<float> p((size_t)(a.m * groups));
    cpu_rt::parallel_range(a.m * groups, 256, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; t++) {
        float sum = sums[t];
        if (drop.on && s.pool == Pool::peft) {
          const int64_t first = (t / groups) * a.in + (t % groups) * group;
          sum = 0.f;
          for (int64_t i = first; i < first + group; i++) sum += xf[i] * drop.factor((uint64_t)i);
        }
        sum *= a.pool_scale;
        if (drop.on && s.pool != Pool::peft) sum *= drop.factor((uint64_t)t);
        p[t] = sum;
      }
    });
    return p;
  }

  /// hs [m, rank] = s·p·Aᵀ: the adapter's hidden activations, already scaled.
  static std::vector<float> adapter_hidden(const LayerArgs& a, int64_t groups, const std::vector<float>& p) {
    std::vector<float> hs((size_t)(a.m * a.rank));
    gemm_strided(a.m, a.rank, groups, {p.data(), groups, 1}, {a.lora_a, 1, groups}, hs.data(), a.rank, false);
    for (float& v : hs) v *= a.scale;
    return hs;
  }

  // ---- forward --------------------------------------------------------------------------------------------
  static void forward(const SpecConsts& s, const LayerArgs& a, const void* x, void* y) {
    if (a.m <= 0 || a.out <= 0) return;
    const View w = view(s, a);
    const InF32 xf(s.dtype, x, a.m * a.in);
    const bool gemv = a.m <= s.gemv_max_rows;
    std::vector<float> sums, hs;
    if (gemv || a.rank > 0) sums = group_sums(s.group, xf.p, a.m, a.in);
    if (a.rank > 0) hs = adapter_hidden(a, w.groups, pooled(s, a, xf.p, sums));
    OutF32 yf(s.dtype, y, a.m * a.out);
    if (gemv) {
      ActQ8 xq;
      const bool int8 = FAST && a.int8_activations != 0;
      if (int8) xq = quantize_activations<BITS>(xf.p, a.m, a.in);
      std::vector<float> xt;  // 4 bits: x in the order gemv_q4.h reads it
      if constexpr (FAST && BITS == 4) {
        if (!int8) xt = transpose_spans(xf.p, a.m, a.in);
      }
      // Up to kGemvRowsPerPass rows of x per pass over a row of W (8 with int8 activations, whose per-row
      // registers are fewer), so its q is unpacked once for all of them.
      const int64_t per_pass = int8 ? 8 : kGemvRowsPerPass;
      auto pass = [&](auto rows, int64_t o0, int64_t o1, int64_t m0) {
        constexpr int RR = decltype(rows)::value;
        if constexpr (RR <= kGemvRowsPerPass) {
          if (!int8) {
            if constexpr (FAST && BITS == 4) return gemv_tile(a, w, Q4Rows<S, RR>(w, xt.data(), a.in, m0), o0, o1, m0, sums, hs, yf.p);
            for (int64_t o = o0; o < o1; o++) gemv_rows<RR>(a, w, o, m0, xf.p, sums, hs, yf.p);
            return;
          }
        }
        if constexpr (FAST) gemv_tile(a, w, Int8Rows<BITS, S, RR>(w, xq, m0), o0, o1, m0, sums, hs, yf.p);
      };
      // Chunks of at least ~32k weights·rows, so a small layer does not pay for waking the pool.
      const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, a.in * a.m));
      cpu_rt::parallel_chunks(a.out, grain, [&](int64_t ob, int64_t oe) {
        for (int64_t o0 = ob; o0 < oe; o0 += kGemvTileRows) {
          const int64_t o1 = std::min(oe, o0 + kGemvTileRows);
          for (int64_t m0 = 0; m0 < a.m; m0 += per_pass) {
            switch (std::min<int64_t>(per_pass, a.m - m0)) {
              case 1: pass(std::integral_constant<int, 1>{}, o0, o1, m0); break;
              case 2: pass(std::integral_constant<int, 2>{}, o0, o1, m0); break;
              case 3: pass(std::integral_constant<int, 3>{}, o0, o1, m0); break;
              case 4: pass(std::integral_constant<int, 4>{}, o0, o1, m0); break;
              case 5: pass(std::integral_constant<int, 5>{}, o0, o1, m0); break;
              case 6: pass(std::integral_constant<int, 6>{}, o0, o1, m0); break;
              case 7: pass(std::integral_constant<int, 7>{}, o0, o1, m0); break;
              default: pass(std::integral_constant<int, 8>{}, o0, o1, m0); break;
            }
          }
        }
      });
    } else {
      Blocking bl = s.blocking;
      if (FAST) bl.kc = std::max<int64_t>(32, bl.kc / 32 * 32);  // panels start on whole 32-blocks
      // y = x·Ŵᵀ + (s·h)·Bᵀ: the adapter's rank-sized K rides in the base product's last panel.
      const Strided lora_bt{a.lora_b, 1, a.rank};
      const GemmTail lora{a.rank, {hs.data(), a.rank, 1}, pack_strided<float>, &lora_bt};
      gemm(a.m, a.out, a.in, {xf.p, a.in, 1}, pack_w_transposed<BITS, FAST, S>, &w, yf.p, a.out, false, bl,
           a.rank > 0 ? &lora : nullptr);
    }
    yf.finish();
  }

  /// y[m0 .. m0+RR, o] for output rows [o0, o1) (at most kGemvTileRows), through a resumable walker (Q4Rows,
  /// Int8Rows). From two rows of x on, Q4Rows' rows are walked in slices that fit in L1 next to the tile's q,
  /// so a slice is read from L2 once for the whole tile: 4–16 rows of x do not fit in L1 whole, and reading all
  /// of them again for every output row made a batched decode wait on L2 (8 rows of 2048 inputs: 64 KB per
  /// output row). Each output row's sums are carried between slices: the bits do not depend on the slicing.
  template <class Rows, int RR = Rows::kRows>
  static void gemv_tile(const LayerArgs& a, const View& w, const Rows& rows, int64_t o0, int64_t o1, int64_t m0,
                        const std::vector<float>& sums, const std::vector<float>& hs, float* y) {
    typename Rows::Acc acc[kGemvTileRows];
    const int64_t units = rows.units();
    // One row of x is reused only within its own row, so it is never sliced.
    int64_t slice = units;
    if constexpr (Rows::kSlices && RR > 1) slice = std::max<int64_t>(1, kGemvSliceBytes / (RR * Rows::kUnitBytes));
    auto store = [&](int64_t o, const typename Rows::Acc& done) {
      float res[RR];
      rows.finish(o, done, res);
      for (int r = 0; r < RR; r++) gemv_store(a, w, o, m0 + r, res[r], row_offset(w, o, m0 + r, sums), hs, y);
    };
    constexpr int NW = Rows::kOutRows;
    // Output rows [ob, oe) over units [u0, u1): NW rows at a time where the walker takes them.
    auto walk = [&](int64_t ob, int64_t oe, int64_t u0, int64_t u1) {
      int64_t o = ob;
      for (; o + NW <= oe; o += NW) rows.template add<NW>(o, u0, u1, acc + (o - o0));
      for (; o < oe; o++) rows.template add<1>(o, u0, u1, acc + (o - o0));
    };
    if (slice >= units) {  // x fits: a row (or pair) at a time
      for (int64_t o = o0; o < o1; o += NW) {
        const int64_t oe = std::min(o1, o + NW);
        for (int64_t k = o; k < oe; k++) rows.begin(k, acc[k - o0]);
        walk(o, oe, 0, units);
        for (int64_t k = o; k < oe; k++) store(k, acc[k - o0]);
      }
      return;
    }
    for (int64_t o = o0; o < o1; o++) rows.begin(o, acc[o - o0]);
    for (int64_t u0 = 0; u0 < units; u0 += slice) walk(o0, o1, u0, std::min(units, u0 + slice));
    for (int64_t o = o0; o < o1; o++) store(o, acc[o - o0]);
  }

  /// y[m0 .. m0+RR, o] for the widths gemv_q4.h and the int8 GEMV do not take: per group the q·x dots scaled by
  /// α, plus β·Σx and the adapter; W is never dequantized.
  template <int RR>
  static void gemv_rows(const LayerArgs& a, const View& w, int64_t o, int64_t m0, const float* xf,
                        const std::vector<float>& sums, const std::vector<float>& hs, float* y) {
    float res[RR], offset[RR];
    for (int r = 0; r < RR; r++) offset[r] = row_offset(w, o, m0 + r, sums);
    gemv_dots<RR>(w, o, xf + m0 * a.in, a.in, res);
    for (int r = 0; r < RR; r++) gemv_store(a, w, o, m0 + r, res[r], offset[r], hs, y);
  }

  /// res[r] = Σ_groups α·(q·x_r) of row o for RR rows of x in input order, a block at a time (the widths
  /// gemv_q4.h does not take).
  template <int RR>
  static void gemv_dots(const View& w, int64_t o, const float* x0, int64_t in, float (&res)[RR]) {
    const int64_t group = w.group, groups = w.groups;
    const S* alpha = w.alpha + o * groups;  // read once per group; fp16 widened with F16C (scale_f32)
    const uint32_t* row = w.row(o);
    const float* x[RR];
    for (int r = 0; r < RR; r++) x[r] = x0 + r * in;
    if constexpr (FAST) {
      // Independent partial dots per row (4 for one or two rows, 2 for more) so the FMAs do not wait on
      // each other; 8 accumulators plus the block's 4 q vectors stay in the 16 AVX registers.
      constexpr int P = RR <= 2 ? 4 : 2;
      f8 acc[RR];
      for (int r = 0; r < RR; r++) acc[r] = f8_zero();
      for (int64_t k = 0; k < groups; k++) {
        f8 dot[RR][P];
        for (int r = 0; r < RR; r++)
          for (int c = 0; c < P; c++) dot[r][c] = f8_zero();
        for (int64_t i = k * group; i < (k + 1) * group; i += 32) {
          f8 q[4];
          unpack_block<BITS>(row + (i >> 5) * BITS, q);
#pragma GCC unroll 4
          for (int r = 0; r < RR; r++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) dot[r][c % P] = f8_fma(q[c], f8_load(x[r] + i + 8 * c), dot[r][c % P]);
        }
        const f8 ak = f8_set1(scale_f32(alpha[k]));
        for (int r = 0; r < RR; r++) {
          f8 d = dot[r][0];
          for (int c = 1; c < P; c++) d = f8_add(d, dot[r][c]);
          acc[r] = f8_fma(ak, d, acc[r]);
        }
      }
      for (int r = 0; r < RR; r++) res[r] = f8_sum(acc[r]);
    } else {
      for (int r = 0; r < RR; r++) res[r] = 0.f;
      for (int64_t k = 0; k < groups; k++) {
        float dot[RR] = {};
        for (int64_t i = k * group; i < (k + 1) * group; i++) {
          const float q = (float)unpack_q(row, i, BITS);
          for (int r = 0; r < RR; r++) dot[r] += q * x[r][i];
        }
        const float ak = scale_f32(alpha[k]);
        for (int r = 0; r < RR; r++) res[r] += ak * dot[r];
      }
    }
  }

  // ---- backward -------------------------------------------------------------------------------------------
  static void backward(const SpecConsts& s, const LayerArgs& a, const void* x, const void* dy, void* dx,
                       float* grad_a, float* grad_b) {
    const int64_t group = s.group, groups = a.in / group, R = a.rank;
    if (a.m <= 0) {
      std::fill(grad_a, grad_a + R * groups, 0.f);
      std::fill(grad_b, grad_b + a.out * R, 0.f);
      return;
    }
    const View w = view(s, a);
    const InF32 dyf(s.dtype, dy, a.m * a.out);
    OutF32 dxf(s.dtype, dx, a.m * a.in);
    Blocking bl = s.blocking;
    if (FAST) bl.nc = std::max<int64_t>(32, (bl.nc + 31) / 32 * 32);  // panels start on whole 32-blocks
    gemm(a.m, a.in, a.out, {dyf.p, a.out, 1}, pack_w<BITS, FAST, S>, &w, dxf.p, a.in, false, bl);
    if (R > 0) {
      const InF32 xf(s.dtype, x, a.m * a.in);
      const std::vector<float> p = pooled(s, a, xf.p, group_sums(group, xf.p, a.m, a.in));
      const std::vector<float> hs = adapter_hidden(a, groups, p);
      // dB = s·dyᵀ·h
      gemm_strided(a.out, R, a.m, {dyf.p, 1, a.out}, {hs.data(), R, 1}, grad_b, R, false);
      // dh = s·dy·B
      std::vector<float> dh((size_t)(a.m * R));
      gemm_strided(a.m, R, a.out, {dyf.p, a.out, 1}, {a.lora_b, R, 1}, dh.data(), R, false);
      for (float& v : dh) v *= a.scale;
      // dA = dhᵀ·p
      gemm_strided(R, groups, a.m, {dh.data(), 1, R}, {p.data(), groups, 1}, grad_a, groups, false);
      // dp = dh·A, then back through dropout and pooling to every input of its group
      std::vector<float> dp((size_t)(a.m * groups));
      gemm_strided(a.m, groups, R, {dh.data(), R, 1}, {a.lora_a, groups, 1}, dp.data(), groups, false);
      const Dropout drop(a);
      cpu_rt::parallel_range(a.m * groups, 256, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; t++) {
          float d = a.pool_scale * dp[t];
          if (drop.on && s.pool != Pool::peft) d *= drop.factor((uint64_t)t);
          const int64_t first = (t / groups) * a.in + (t % groups) * group;
          float* dst = dxf.p + first;
          if (drop.on && s.pool == Pool::peft) {
            for (int64_t i = 0; i < group; i++) dst[i] += d * drop.factor((uint64_t)(first + i));
          } else {
            for (int64_t i = 0; i < group; i++) dst[i] += d;
          }
        }
      });
    }
    dxf.finish();
  }
};

/// β' = β + s·c·(B·A), in fp32 and then stored as S (for fp16 scales the one rounding of the merge). Only
/// beta_out is written (it may alias beta); q and α stay as they are.
template <class S>
inline void merge(const SpecConsts& s, const LayerArgs& a, S* beta_out) {
  const S* beta = static_cast<const S*>(a.beta);
  const int64_t groups = a.in / s.group, R = a.rank;
  const float sc = a.scale * a.pool_scale;
  cpu_rt::parallel_range(a.out, 16, [&](int64_t ob, int64_t oe) {
    std::vector<float> delta((size_t)groups);
    for (int64_t o = ob; o < oe; o++) {
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t j = 0; j < R; j++) {
        const float b = a.lora_b[o * R + j];
        const float* arow = a.lora_a + j * groups;
        for (int64_t k = 0; k < groups; k++) delta[k] += b * arow[k];
      }
      for (int64_t k = 0; k < groups; k++)
        store_scale(scale_f32(beta[o * groups + k]) + sc * delta[k], &beta_out[o * groups + k]);
    }
  });
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
