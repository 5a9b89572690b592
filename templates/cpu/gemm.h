// The one GEMM engine of the CPU backend: C[M,N] (+)= A[M,K]·B[K,N] with cache blocking (KC×NC panels of B
// packed once and reused for every row of A), packed MR-row slices of A and an MR×NR register-blocked
// micro-kernel (6×16: twelve 8-lane accumulators). B is never read directly: a packing callback writes each
// panel, so the same engine multiplies by a dequantized INT-b weight (forward: Ŵᵀ, backward: Ŵ) or by a
// plain float matrix (the rank-sized LoRA products, the core float GEMM of templates/core). A few rows times
// a transposed float matrix (decode) skip packing altogether: gemm_few_rows.
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

constexpr int MR = 6;
constexpr int NR = 16;

struct Blocking {
  int64_t mc = 72, nc = 256, kc = 512;  // compiler/plan.ts says why
};

/// Writes B[k0 .. k0+kc) × [n0 .. n0+nc) into `panel` as ceil(nc/NR) slices, each [kc][NR] row-major,
/// columns past nc zero. n0 is a multiple of NR.
using PackB = void (*)(const void* ctx, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* panel);

/// Element types a plain matrix B can be stored in: fp32, or fp16/bf16 bits (a token table kept in its file's
/// half type), widened to fp32 as they are loaded.
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
inline float weight_f32(float v) { return v; }
inline float weight_f32(f16_t v) { return f16_to_f32(v.bits); }
inline float weight_f32(bf16_t v) { return bf16_to_f32(v.bits); }
inline f8 f8_weights(const float* p) { return f8_load(p); }
inline f8 f8_weights(const f16_t* p) { return f8_from_f16(&p->bits); }
inline f8 f8_weights(const bf16_t* p) { return f8_from_bf16(&p->bits); }

/// A strided matrix: element (i, k) at p[i*rs + k*cs] (rs = ld, cs = 1 for row-major; swapped for Aᵀ).
template <class T>
struct StridedOf {
  const T* p;
  int64_t rs, cs;
  float at(int64_t i, int64_t k) const { return weight_f32(p[i * rs + k * cs]); }
};
using Strided = StridedOf<float>;

template <class T>
inline void pack_strided(const void* ctx, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* panel) {
  const StridedOf<T>& b = *static_cast<const StridedOf<T>*>(ctx);
  const int64_t slices = (nc + NR - 1) / NR;
  if (b.cs == 1) {  // rows of B contiguous: walk each row once, scattering it over the slices
    for (int64_t k = 0; k < kc; k++) {
      const T* src = b.p + (k0 + k) * b.rs + n0;
      for (int64_t s = 0; s < slices; s++) {
        float* dst = panel + (s * kc + k) * NR;
        const int64_t w = std::min<int64_t>(NR, nc - s * NR);
        if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src + s * NR, w * sizeof(float));
        else for (int64_t n = 0; n < w; n++) dst[n] = weight_f32(src[s * NR + n]);
        for (int64_t n = w; n < NR; n++) dst[n] = 0.f;
      }
    }
    return;
  }
  for (int64_t s = 0; s < slices; s++) {  // columns of B contiguous (Bᵀ of a row-major weight)
    float* slice = panel + s * kc * NR;
    const int64_t w = std::min<int64_t>(NR, nc - s * NR);
    for (int64_t k = 0; k < kc; k++) {
      float* dst = slice + k * NR;
      for (int64_t n = 0; n < w; n++) dst[n] = b.at(k0 + k, n0 + s * NR + n);
      for (int64_t n = w; n < NR; n++) dst[n] = 0.f;
    }
  }
}

/// acc += a[kc][MR]ᵀ · b[kc][NR].
inline void micro_products(int64_t kc, const float* a, const float* b, f8 (&acc)[MR][2]) {
  for (int64_t k = 0; k < kc; k++, a += MR, b += NR) {
    const f8 b0 = f8_load(b), b1 = f8_load(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      const f8 ar = f8_set1(a[r]);
      acc[r][0] = f8_fma(ar, b0, acc[r][0]);
      acc[r][1] = f8_fma(ar, b1, acc[r][1]);
    }
  }
}

/// The packed tail of a product, see GemmTail: kt more inputs, as [kt][MR] and [kt][NR] slices.
struct TileTail {
  int64_t kt = 0;
  const float* a = nullptr;
  const float* b = nullptr;
};

/// c[mr×nr] (+)= a[kc][MR]ᵀ · b[kc][NR] (+ the tail's products, in the same accumulators); the full tile is
/// computed, only mr×nr stored.
inline void micro_kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int mr, int nr,
                         bool accumulate, TileTail tail = {}) {
  f8 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = f8_zero();
  micro_products(kc, a, b, acc);
  if (tail.kt > 0) micro_products(tail.kt, tail.a, tail.b, acc);
  if (mr == MR && nr == NR) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      float* cr = c + r * ldc;
      if (accumulate) {
        acc[r][0] = f8_add(acc[r][0], f8_load(cr));
        acc[r][1] = f8_add(acc[r][1], f8_load(cr + 8));
      }
      f8_store(cr, acc[r][0]);
      f8_store(cr + 8, acc[r][1]);
    }
    return;
  }
  float tile[NR];
  for (int r = 0; r < mr; r++) {
    f8_store(tile, acc[r][0]);
    f8_store(tile + 8, acc[r][1]);
    float* cr = c + r * ldc;
    for (int n = 0; n < nr; n++) cr[n] = accumulate ? cr[n] + tile[n] : tile[n];
  }
}

/// A[m0 .. m0+mc) × [k0 .. k0+kc) as MR-row slices [kc][MR], rows past mc zero.
inline void pack_a(const Strided& a, int64_t m0, int64_t mc, int64_t k0, int64_t kc, float* out) {
  static_assert(MR <= 8, "pack_a transposes MR rows as eight");
  for (int64_t i = 0; i < mc; i += MR) {
    float* slice = out + (i / MR) * kc * MR;
    const int64_t h = std::min<int64_t>(MR, mc - i);
    const float* src = a.p + (m0 + i) * a.rs + k0 * a.cs;
    if (a.cs == 1) {  // rows contiguous: read along k
      int64_t k = 0;
      if (h == MR) {  // eight inputs of the MR rows at a time, turned into eight MR-wide rows in registers
        for (; k + 8 <= kc; k += 8) {
          f8 r[8];
          for (int j = 0; j < 8; j++) r[j] = j < MR ? f8_load(src + j * a.rs + k) : f8_zero();
          f8_transpose8(r);
          for (int t = 0; t < 8; t++) f8_store_first<MR>(slice + (k + t) * MR, r[t]);
        }
      }
      for (int64_t r = 0; r < MR; r++)
        for (int64_t kk = k; kk < kc; kk++) slice[kk * MR + r] = r < h ? src[r * a.rs + kk] : 0.f;
    } else {  // a transposed view (Aᵀ of a row-major matrix): read along the rows instead
      for (int64_t k = 0; k < kc; k++)
        for (int64_t r = 0; r < MR; r++) slice[k * MR + r] = r < h ? src[r * a.rs + k * a.cs] : 0.f;
    }
  }
}

/// A thread's packing buffers, kept between calls so a steady state allocates nothing.
struct GemmScratch {
  std::vector<float> panel, apack, tail_b, tail_a;
};
inline GemmScratch& scratch() {
  thread_local GemmScratch buffers;
  return buffers;
}

/// All of A packed once, before the tasks split N: [K blocks of kc][M padded to MR][kc][MR] — the MR-row slice
/// of rows i.. and inputs k0.. is at at(k0, i). Every N panel reads the same copy: packed per panel, A cost
/// prefill as much as the panels' dequantization when N is wide.
struct PackedA {
  std::vector<float> data;
  int64_t m_pad = 0, kc = 0, K = 0;
  int64_t offset(int64_t k0, int64_t i) const { return k0 * m_pad + i * std::min(kc, K - k0); }
  const float* at(int64_t k0, int64_t i) const { return data.data() + offset(k0, i); }
  float* at(int64_t k0, int64_t i) { return data.data() + offset(k0, i); }
};

/// The most floats of A packed once and shared (16 MB): beyond that, reading it back costs more than packing.
constexpr int64_t kSharedPackFloats = int64_t{1} << 22;

inline void pack_all_a(const Strided& a, int64_t M, int64_t K, int64_t kc, PackedA& out) {
  out.m_pad = (M + MR - 1) / MR * MR;
  out.kc = kc;
  out.K = K;
  out.data.resize((size_t)(out.m_pad * K));
  const int64_t k_blocks = (K + kc - 1) / kc, slices = out.m_pad / MR;
  // Chunks of ~16k packed floats per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / (kc * MR));
  cpu_rt::parallel_range(k_blocks * slices, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t k0 = (t / slices) * kc, i = (t % slices) * MR;
      pack_a(a, i, std::min<int64_t>(MR, M - i), k0, std::min(kc, K - k0), out.at(k0, i));
    }
  });
}

/// A few more inputs appended to a product's K: C = [A | a]·[B ; b]. A LoRA update y += (s·h)·Bᵀ (rank-sized)
/// rides in the base product's last panel this way, in the same accumulators, instead of a second pass over C.
struct GemmTail {
  int64_t k;
  Strided a;       // [M, k]
  PackB pack_b;    // b [k, N]
  const void* ctx;
};

/// C[M,N] = A·B (+ C when accumulate), with `tail`'s products added. Tasks split N into NC-wide panels and,
/// when that leaves threads idle, M into row ranges; each task packs its own panels, so a weight panel is
/// dequantized once per task.
[[gnu::noinline]] inline void gemm(int64_t M, int64_t N, int64_t K, const Strided& A, PackB pack_b, const void* ctx,
                                   float* C, int64_t ldc, bool accumulate, Blocking bl, const GemmTail* tail = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; i++) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  // Below ~100k multiply-adds waking the pool costs more than the work: one task, one panel.
  const bool tiny = (double)M * (double)N * (double)K < (double)(1 << 17);
  const int64_t mc = std::max<int64_t>(MR, (bl.mc + MR - 1) / MR * MR);
  const int64_t nc = tiny ? (N + NR - 1) / NR * NR : std::max<int64_t>(NR, (bl.nc + NR - 1) / NR * NR);
  const int64_t kc = std::max<int64_t>(1, bl.kc);
  const int64_t n_tasks_n = (N + nc - 1) / nc;
  const int64_t threads = tiny ? 1 : cpu_rt::thread_count();
  const int64_t m_slices = (M + MR - 1) / MR;
  const int64_t n_tasks_m =
      tiny ? 1 : std::min(m_slices, n_tasks_n >= 2 * threads ? 1 : (2 * threads + n_tasks_n - 1) / n_tasks_n);
  const int64_t rows_per_task = (m_slices + n_tasks_m - 1) / n_tasks_m * MR;
  // A wide N (many panels) packs A once for all of them, unless A is large: then each task packs the block
  // it is about to use, which is still in L2 when the micro-kernels read it.
  const bool shared_a = n_tasks_n > 2 && M * K <= kSharedPackFloats;
  thread_local PackedA packed;  // the calling thread's: tasks on the pool's threads only read it
  if (shared_a) pack_all_a(A, M, K, kc, packed);
  const PackedA& pa = packed;
  cpu_rt::parallel_for(n_tasks_n * n_tasks_m, [&](int64_t t) {
    const int64_t n0 = (t % n_tasks_n) * nc, ncur = std::min(nc, N - n0);
    const int64_t mb = (t / n_tasks_n) * rows_per_task, me = std::min(M, mb + rows_per_task);
    if (mb >= me) return;
    auto& [panel, apack, tail_b, tail_a] = scratch();
    const int64_t slices = (ncur + NR - 1) / NR;
    panel.resize((size_t)(kc * slices * NR));
    if (!shared_a) apack.resize((size_t)(mc * kc));
    if (tail) {
      tail_b.resize((size_t)(tail->k * slices * NR));
      tail_a.resize((size_t)(mc * tail->k));
      tail->pack_b(tail->ctx, 0, tail->k, n0, ncur, tail_b.data());
    }
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t kcur = std::min(kc, K - k0);
      const bool last = k0 + kcur >= K;
      pack_b(ctx, k0, kcur, n0, ncur, panel.data());
      const bool acc = accumulate || k0 > 0;
      for (int64_t m0 = mb; m0 < me; m0 += mc) {
        const int64_t mcur = std::min(mc, me - m0);
        if (!shared_a) pack_a(A, m0, mcur, k0, kcur, apack.data());
        if (tail && last) pack_a(tail->a, m0, mcur, 0, tail->k, tail_a.data());
        for (int64_t j = 0; j < ncur; j += NR) {
          const float* bs = panel.data() + (j / NR) * kcur * NR;
          for (int64_t i = 0; i < mcur; i += MR) {
            const float* as = shared_a ? pa.at(k0, m0 + i) : apack.data() + (i / MR) * kcur * MR;
            TileTail tt;
            if (tail && last) tt = {tail->k, tail_a.data() + (i / MR) * tail->k * MR, tail_b.data() + (j / NR) * tail->k * NR};
            micro_kernel(kcur, as, bs, C + (m0 + i) * ldc + n0 + j, ldc, (int)std::min<int64_t>(MR, mcur - i),
                         (int)std::min<int64_t>(NR, ncur - j), acc, tt);
          }
        }
      }
    }
  });
}

/// Rows of A·B up to which gemm_strided skips packing when A's rows and B's columns are contiguous (x·Wᵀ of
/// a row-major weight, i.e. decode): packing W costs about as much as using it a few times (measured on
/// 4096×4096 by CPU time: the dot path is 3.5× faster for 1 row, 1.7× for 8, still ~1.1× ahead at 16).
constexpr int64_t kFewRows = 16;

/// out[r][c] = dot(row r of x, column c of w) over k for R rows and four columns: 4R independent FMA chains
/// hide the FMA latency, and each loaded piece of w serves R rows.
template <int R, class T>
inline void dots(const float* x, int64_t ldx, const T* w, int64_t ldw, int64_t k, float out[R][4]) {
  f8 acc[R][4];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = f8_zero();
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) {
    const f8 w0 = f8_weights(w + p), w1 = f8_weights(w + ldw + p), w2 = f8_weights(w + 2 * ldw + p),
             w3 = f8_weights(w + 3 * ldw + p);
#pragma GCC unroll 2
    for (int r = 0; r < R; r++) {
      const f8 xv = f8_load(x + r * ldx + p);
      acc[r][0] = f8_fma(w0, xv, acc[r][0]);
      acc[r][1] = f8_fma(w1, xv, acc[r][1]);
      acc[r][2] = f8_fma(w2, xv, acc[r][2]);
      acc[r][3] = f8_fma(w3, xv, acc[r][3]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < 4; c++) {
      float sum = f8_sum(acc[r][c]);
      // std::fma, not a*b + c the compiler may or may not contract: fp32 and half weights round alike
      for (int64_t q = p; q < k; q++) sum = std::fma(x[r * ldx + q], weight_f32(w[c * ldw + q]), sum);
      out[r][c] = sum;
    }
}

template <class T>
inline float dot1(const float* x, const T* w, int64_t k) {
  f8 acc = f8_zero();
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) acc = f8_fma(f8_load(x + p), f8_weights(w + p), acc);
  float sum = f8_sum(acc);
  for (; p < k; p++) sum = std::fma(x[p], weight_f32(w[p]), sum);
  return sum;
}

/// C[M,N] (+)= A·B without packing, A.cs == 1 and B.rs == 1: B is streamed once, four columns at a time, and
/// every row of A is dotted with them while they are in cache.
template <class T>
inline void gemm_few_rows(int64_t M, int64_t N, int64_t K, const Strided& A, const StridedOf<T>& B, float* C,
                          int64_t ldc, bool accumulate) {
  const auto put = [&](float* c, float v) { *c = accumulate ? *c + v : v; };
  // Chunks of at least ~64k multiply-adds, so a small product does not pay for waking the pool.
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(1, K * M));
  cpu_rt::parallel_range(N, grain, [&](int64_t jb, int64_t je) {
    int64_t j = jb;
    for (; j + 4 <= je; j += 4) {
      const T* w = B.p + j * B.cs;
      int64_t i = 0;
      for (; i + 2 <= M; i += 2) {
        float s[2][4];
        dots<2>(A.p + i * A.rs, A.rs, w, B.cs, K, s);
        for (int r = 0; r < 2; r++)
          for (int c = 0; c < 4; c++) put(C + (i + r) * ldc + j + c, s[r][c]);
      }
      if (i < M) {
        float s[1][4];
        dots<1>(A.p + i * A.rs, A.rs, w, B.cs, K, s);
        for (int c = 0; c < 4; c++) put(C + i * ldc + j + c, s[0][c]);
      }
    }
    for (; j < je; j++)
      for (int64_t i = 0; i < M; i++) put(C + i * ldc + j, dot1(A.p + i * A.rs, B.p + j * B.cs, K));
  });
}

/// C[M,N] (+)= A·B for plain matrices given as strided views (B in fp32, or fp16/bf16 bits).
template <class T = float>
[[gnu::noinline]] inline void gemm_strided(int64_t M, int64_t N, int64_t K, const Strided& A, const StridedOf<T>& B,
                                           float* C, int64_t ldc, bool accumulate, Blocking bl = {}) {
  if (M <= kFewRows && A.cs == 1 && B.rs == 1 && M > 0 && N > 0 && K > 0) {
    gemm_few_rows(M, N, K, A, B, C, ldc, accumulate);
    return;
  }
  gemm(M, N, K, A, pack_strided<T>, &B, C, ldc, accumulate, bl);
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
