// The tiled engine for many rows: C[M, N] = A[M, K] · op(Ŵ), where A is x (forward: N = out, K = in, Ŵᵀ) or
// dy (backward dx: N = in, K = out, Ŵ). Per K-tile the activation tile and the packed weight tile stream into
// shared memory through a STAGES-deep cp.async pipeline; the weight tile is dequantized once per block into a
// shared operand tile; fp16/bf16 multiply on tensor cores (ldmatrix + mma.sync m16n8k16, fp32 accumulators),
// fp32 activations take a SIMT register-tiled path (exact fp32 products, no operand rounding).
#pragma once

namespace qalora {
namespace QL_BACKEND_NS {
namespace kern {

template <class T, class S = float>
struct GemmParams {
  const T* a;              // [m, K]: x (forward) or dy (backward)
  const uint32_t* qweight;
  const S* alpha;          // S: float, or fp16 bits (`scales fp16`), read through scale_to_f32
  const S* beta;
  const float* lora_b;     // forward epilogue: [out, rank]
  const float* h;          // forward epilogue: [m, rank]
  const float* dpx;        // backward epilogue: [m, L] adapter gradient of each group's inputs (may be null)
  T* c;                    // [m, N]
  int64_t m, in, out;
  int rank;
  float scale;
  DropoutArgs drop;        // backward with peft pooling: the per-input mask
};

// Blocks per SM the plan's register budget allows: ptxas must fit max_registers (or fail the build).
template <class C>
constexpr int gemm_min_blocks() {
  return 65536 / (C::gemm_warps * 32 * C::max_registers) > 0 ? 65536 / (C::gemm_warps * 32 * C::max_registers) : 1;
}

template <class C, bool TRANS>
struct Tile {
  using act = typename C::act;
  using op = typename ql::Act<act>::op;
  static constexpr int BM = C::gemm_bm, BN = C::gemm_bn, BK = C::gemm_bk, WARPS = C::gemm_warps;
  static constexpr int STAGES = C::gemm_stages, THREADS = WARPS * 32, BITS = C::bits;
  static constexpr int WROWS = TRANS ? BK : BN;  // packed rows (output features) per tile
  static constexpr int WCOLS = TRANS ? BN : BK;  // inputs per tile, whole 32-blocks
  static constexpr int WWORDS = WCOLS / 32 * BITS;
  static constexpr int XCHUNK = 16 / (int)sizeof(act);           // elements per 16-byte copy
  static constexpr int XSTRIDE = BK + XCHUNK;                     // one 16-byte pad: ldmatrix rows hit distinct banks
  static constexpr int WDSTRIDE = WCOLS + 16 / (int)sizeof(op);
  static constexpr int X_STAGE = BM * XSTRIDE;
  static constexpr int W_STAGE = WROWS * WWORDS;
  static constexpr size_t x_bytes = (size_t)STAGES * X_STAGE * sizeof(act);
  static constexpr size_t wd_bytes = (size_t)WROWS * WDSTRIDE * sizeof(op);
  static constexpr size_t wq_bytes = ((size_t)STAGES * W_STAGE * 4 + 15) / 16 * 16;
  static constexpr int CSTRIDE = BN + 4;  // fp32 output tile staged for the epilogue, reusing the pipeline's memory
  static constexpr size_t pipeline_bytes = x_bytes + wd_bytes + wq_bytes;
  // Forward epilogue: the adapter s·h·Bᵀ for the tile, RC ranks at a time from shared memory (padded rows).
  static constexpr int RC = 16;
  static constexpr size_t adapter_bytes = TRANS ? 0 : (size_t)(BM + BN) * (RC + 1) * 4;
  static constexpr size_t output_bytes = (size_t)BM * CSTRIDE * 4 + adapter_bytes;
  static constexpr size_t smem_bytes = pipeline_bytes > output_bytes ? pipeline_bytes : output_bytes;
  static constexpr bool W_VEC = BITS % 4 == 0 && WWORDS % 4 == 0;  // packed rows allow 16-byte copies
  // Tensor-core warp grid: WM × WN warps, each MT × NT fragments of 16 × 8.
  static constexpr int WM = WARPS >= 4 && BM % 32 == 0 ? 2 : 1, WN = WARPS / WM;
  static constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NT = WTN / 8;
  // SIMT thread grid: each thread TM × TN outputs, strided by the thread grid.
  static constexpr int TN = 8, TXN = BN / TN, TY = THREADS / TXN, TM = BM / TY;
  static_assert(BK % 32 == 0 && BN % 32 == 0, "tiles cover whole 32-input blocks");
  static_assert(STAGES >= 2, "the pipeline needs two stages");
  static_assert(!ql::Act<act>::tensor_cores || (BM % (WM * 16) == 0 && BN % (WN * 16) == 0 && BK % 16 == 0),
                "tensor-core tile must split into 16×16 warp fragments");
  static_assert(ql::Act<act>::tensor_cores || (THREADS % TXN == 0 && BM % TY == 0), "SIMT tile must split evenly");
};

template <class C, bool TRANS>
struct TileEngine {
  using T = Tile<C, TRANS>;
  using act = typename T::act;
  using op = typename T::op;
  using A = ql::Act<act>;

  const GemmParams<act, typename C::scale>& p;
  act* xs;
  op* wd;
  uint32_t* wq;
  int64_t m0, n0, K, wpr;

  QL_DEV void load_tile(int stage, int64_t kt) const {
    const int64_t k0 = kt * T::BK;
    act* xdst = xs + stage * T::X_STAGE;
    constexpr int xchunks = T::BK / T::XCHUNK;
    const bool xvec = K % T::XCHUNK == 0;
    QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::BM * xchunks; idx += T::THREADS) {
      const int r = idx / xchunks, cc = (idx % xchunks) * T::XCHUNK;
      const int64_t gm = m0 + r, gk = k0 + cc;
      act* dst = xdst + r * T::XSTRIDE + cc;
      if (xvec && gm < p.m && gk + T::XCHUNK <= K) {
        ql::cp_async<16>(dst, p.a + gm * K + gk);
      } else {  // ragged edge: plain loads, zero outside
        QL_UNROLL for (int e = 0; e < T::XCHUNK; e++) dst[e] = gm < p.m && gk + e < K ? p.a[gm * K + gk + e] : A::from_f(0.0f);
      }
    }
    const int64_t row0 = TRANS ? k0 : n0, word0 = (TRANS ? n0 : k0) / 32 * T::BITS;
    uint32_t* wdst = wq + stage * T::W_STAGE;
    constexpr int per = T::W_VEC ? 4 : 1;
    QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::WROWS * T::WWORDS / per; idx += T::THREADS) {
      const int r = idx / (T::WWORDS / per), cw = (idx % (T::WWORDS / per)) * per;
      const int64_t go = row0 + r, gw = word0 + cw;
      uint32_t* dst = wdst + r * T::WWORDS + cw;
      if (go < p.out && gw < wpr) {
        ql::cp_async<per * 4>(dst, p.qweight + go * wpr + gw);
      } else {
        QL_UNROLL for (int e = 0; e < per; e++) dst[e] = 0u;
      }
    }
  }

  // Packed stage → operand tile wd[row][input] = α·q + β (0 outside the matrix).
  QL_DEV void dequantize_tile(int stage, int64_t kt) const {
    constexpr int G = C::group, chunks = T::WCOLS / 8;
    const int64_t row0 = TRANS ? kt * T::BK : n0, col0 = TRANS ? n0 : kt * T::BK, L = p.in / G;
    const uint32_t* src = wq + stage * T::W_STAGE;
    QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::WROWS * chunks; idx += T::THREADS) {
      const int r = idx / chunks, c8 = idx % chunks;
      const int64_t go = row0 + r;
      const int gi0 = (int)col0 + c8 * 8, in = (int)p.in;  // positions within a row: 32-bit index math
      float v[8];
      if (go < p.out && gi0 < in) {
        float q[8];
        unpack8<T::BITS>(src + r * T::WWORDS + (c8 >> 2) * T::BITS, c8 & 3, q);
        const auto* arow = p.alpha + go * L;
        const auto* brow = p.beta + go * L;
        if constexpr (G % 8 == 0) {  // the 8 inputs share a group (and lie inside `in`, a multiple of G)
          const float a = scale_to_f32(arow[gi0 / G]), b = scale_to_f32(brow[gi0 / G]);
          QL_UNROLL for (int e = 0; e < 8; e++) v[e] = fmaf(a, q[e], b);
        } else {
          QL_UNROLL for (int e = 0; e < 8; e++) {
            const int gi = gi0 + e, k = gi / G;
            v[e] = gi < in ? fmaf(scale_to_f32(arow[k]), q[e], scale_to_f32(brow[k])) : 0.0f;
          }
        }
      } else {
        QL_UNROLL for (int e = 0; e < 8; e++) v[e] = 0.0f;
      }
      op* dst = wd + r * T::WDSTRIDE + c8 * 8;
      op lanes[8];
      QL_UNROLL for (int e = 0; e < 8; e++) lanes[e] = ql::Act<op>::from_f(v[e]);
      Vec16 packed[sizeof(op) / 2];
      memcpy(packed, lanes, sizeof(lanes));
      QL_UNROLL for (int part = 0; part < (int)(sizeof(op) / 2); part++) reinterpret_cast<Vec16*>(dst)[part] = packed[part];
    }
  }

  QL_DEV float* output_tile() const { return reinterpret_cast<float*>(xs); }

  // Adds s·h·Bᵀ to the staged tile: h rows (one per warp's outputs: broadcast) and B rows (stride RC+1:
  // conflict-free) come through shared memory RC ranks at a time, so each output costs RC FMAs per chunk and
  // no global loads. Called by all threads (it has barriers).
  QL_DEV void add_adapter(float* cs) const {
    float* hs = cs + T::BM * T::CSTRIDE;
    float* bs = hs + T::BM * (T::RC + 1);
    for (int j0 = 0; j0 < p.rank; j0 += T::RC) {
      QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::BM * T::RC; idx += T::THREADS) {
        const int r = idx / T::RC, j = idx % T::RC;
        hs[r * (T::RC + 1) + j] = m0 + r < p.m && j0 + j < p.rank ? p.h[(m0 + r) * p.rank + j0 + j] : 0.0f;
      }
      QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::BN * T::RC; idx += T::THREADS) {
        const int c = idx / T::RC, j = idx % T::RC;
        bs[c * (T::RC + 1) + j] = n0 + c < p.out && j0 + j < p.rank ? p.lora_b[(n0 + c) * p.rank + j0 + j] : 0.0f;
      }
      __syncthreads();
      QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::BM * T::BN; idx += T::THREADS) {
        const int r = idx / T::BN, c = idx % T::BN;
        float l = 0.0f;
        QL_UNROLL for (int j = 0; j < T::RC; j++) l = fmaf(hs[r * (T::RC + 1) + j], bs[c * (T::RC + 1) + j], l);
        cs[r * T::CSTRIDE + c] = fmaf(p.scale, l, cs[r * T::CSTRIDE + c]);
      }
      __syncthreads();
    }
  }

  // Epilogue over the staged fp32 tile: consecutive threads take consecutive outputs (coalesced stores).
  QL_DEV void store_tile() const {
    float* cs = output_tile();
    if constexpr (!TRANS) {
      if (p.rank > 0) add_adapter(cs);  // p.rank is uniform: every thread takes the barriers inside
    }
    const int64_t N = TRANS ? p.in : p.out;
    QL_NO_UNROLL for (int idx = threadIdx.x; idx < T::BM * T::BN; idx += T::THREADS) {
      const int r = idx / T::BN, c = idx % T::BN;
      const int64_t m = m0 + r, n = n0 + c;
      if (m >= p.m || n >= N) continue;
      float v = cs[r * T::CSTRIDE + c];
      if constexpr (TRANS) {
        if (p.dpx) {
          float g = p.dpx[m * (p.in / C::group) + n / C::group];
          if (C::pool == kPoolPeft && p.drop.active) g *= p.drop.keep((uint64_t)(m * p.in + n));
          v += g;
        }
      }
      p.c[m * N + n] = A::from_f(v);
    }
  }
};

// Tensor-core main loop and epilogue (fp16/bf16).
template <class C, bool TRANS>
QL_DEV void run_tensor_cores(const TileEngine<C, TRANS>& e, int64_t ktiles) {
  using T = Tile<C, TRANS>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / T::WN, wn = warp % T::WN;
  float acc[T::MT][T::NT][4];
  QL_UNROLL for (int i = 0; i < T::MT; i++) QL_UNROLL for (int j = 0; j < T::NT; j++) QL_UNROLL for (int k = 0; k < 4; k++) acc[i][j][k] = 0.0f;

  QL_UNROLL for (int s = 0; s < T::STAGES - 1; s++) {
    if (s < ktiles) e.load_tile(s, s);
    ql::cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; kt++) {
    const int stage = (int)(kt % T::STAGES);
    ql::cp_async_wait<T::STAGES - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1 (its stage and wd are free)
    if (kt + T::STAGES - 1 < ktiles) e.load_tile((int)((kt + T::STAGES - 1) % T::STAGES), kt + T::STAGES - 1);
    ql::cp_async_commit();
    e.dequantize_tile(stage, kt);
    __syncthreads();
    const typename T::act* xs = e.xs + stage * T::X_STAGE;
    QL_NO_UNROLL for (int kk = 0; kk < T::BK; kk += 16) {
      uint32_t af[T::MT][4];
      QL_UNROLL for (int mt = 0; mt < T::MT; mt++)
        ql::ldmatrix_x4(af[mt], xs + (wm * T::WTM + mt * 16 + (lane & 15)) * T::XSTRIDE + kk + (lane >> 4) * 8);
      QL_UNROLL for (int np = 0; np < T::NT / 2; np++) {
        uint32_t bf[4];
        const int nrow = wn * T::WTN + np * 16 + (lane >> 4) * 8, khalf = ((lane >> 3) & 1) * 8;
        if constexpr (!TRANS) {
          ql::ldmatrix_x4(bf, e.wd + (nrow + (lane & 7)) * T::WDSTRIDE + kk + khalf);
        } else {
          ql::ldmatrix_x4_trans(bf, e.wd + (kk + khalf + (lane & 7)) * T::WDSTRIDE + nrow);
        }
        QL_UNROLL for (int mt = 0; mt < T::MT; mt++) {
          ql::mma_m16n8k16(acc[mt][2 * np], af[mt], bf, acc[mt][2 * np], typename T::op());
          ql::mma_m16n8k16(acc[mt][2 * np + 1], af[mt], bf + 2, acc[mt][2 * np + 1], typename T::op());
        }
      }
    }
  }
  ql::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the output tile
  float* cs = e.output_tile();
  QL_UNROLL for (int mt = 0; mt < T::MT; mt++)
    QL_UNROLL for (int nt = 0; nt < T::NT; nt++)
      QL_UNROLL for (int k = 0; k < 4; k++)
        cs[(wm * T::WTM + mt * 16 + (lane >> 2) + (k >> 1) * 8) * T::CSTRIDE + wn * T::WTN + nt * 8 + (lane & 3) * 2 + (k & 1)] =
            acc[mt][nt][k];
  __syncthreads();
  e.store_tile();
}

// SIMT main loop and epilogue (fp32): same pipeline, FMA micro-tiles instead of mma.
template <class C, bool TRANS>
QL_DEV void run_simt(const TileEngine<C, TRANS>& e, int64_t ktiles) {
  using T = Tile<C, TRANS>;
  const int tx = threadIdx.x % T::TXN, ty = threadIdx.x / T::TXN;
  float acc[T::TM][T::TN];
  QL_UNROLL for (int i = 0; i < T::TM; i++) QL_UNROLL for (int j = 0; j < T::TN; j++) acc[i][j] = 0.0f;

  QL_UNROLL for (int s = 0; s < T::STAGES - 1; s++) {
    if (s < ktiles) e.load_tile(s, s);
    ql::cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; kt++) {
    const int stage = (int)(kt % T::STAGES);
    ql::cp_async_wait<T::STAGES - 2>();
    __syncthreads();
    if (kt + T::STAGES - 1 < ktiles) e.load_tile((int)((kt + T::STAGES - 1) % T::STAGES), kt + T::STAGES - 1);
    ql::cp_async_commit();
    e.dequantize_tile(stage, kt);
    __syncthreads();
    const float* xs = reinterpret_cast<const float*>(e.xs) + stage * T::X_STAGE;
    const float* wd = reinterpret_cast<const float*>(e.wd);
    QL_NO_UNROLL for (int kk = 0; kk < T::BK; kk++) {
      float a[T::TM], b[T::TN];
      QL_UNROLL for (int i = 0; i < T::TM; i++) a[i] = xs[(ty + i * T::TY) * T::XSTRIDE + kk];
      QL_UNROLL for (int j = 0; j < T::TN; j++)
        b[j] = TRANS ? wd[kk * T::WDSTRIDE + tx + j * T::TXN] : wd[(tx + j * T::TXN) * T::WDSTRIDE + kk];
      QL_UNROLL for (int i = 0; i < T::TM; i++) QL_UNROLL for (int j = 0; j < T::TN; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  ql::cp_async_wait<0>();
  __syncthreads();
  float* cs = e.output_tile();
  QL_UNROLL for (int i = 0; i < T::TM; i++)
    QL_UNROLL for (int j = 0; j < T::TN; j++) cs[(ty + i * T::TY) * T::CSTRIDE + tx + j * T::TXN] = acc[i][j];
  __syncthreads();
  e.store_tile();
}

template <class C, bool TRANS>
__global__ void QL_LAUNCH_BOUNDS(C::gemm_warps * 32, gemm_min_blocks<C>())
    gemm_kernel(GemmParams<typename C::act, typename C::scale> p) {
  using T = Tile<C, TRANS>;
  QL_DYN_SMEM(uint8_t, smem);
  const int64_t K = TRANS ? p.out : p.in;
  const TileEngine<C, TRANS> e{p,
                               reinterpret_cast<typename T::act*>(smem),
                               reinterpret_cast<typename T::op*>(smem + T::x_bytes),
                               reinterpret_cast<uint32_t*>(smem + T::x_bytes + T::wd_bytes),
                               (int64_t)blockIdx.y * T::BM,
                               (int64_t)blockIdx.x * T::BN,
                               K,
                               words_per_row(p.in, T::BITS)};
  const int64_t ktiles = (K + T::BK - 1) / T::BK;
  if constexpr (ql::Act<typename C::act>::tensor_cores) {
    run_tensor_cores<C, TRANS>(e, ktiles);
  } else {
    run_simt<C, TRANS>(e, ktiles);
  }
}

}  // namespace kern
}  // namespace QL_BACKEND_NS
}  // namespace qalora
