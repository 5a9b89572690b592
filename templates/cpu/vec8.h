// Eight fp32 / u32 lanes: AVX2+FMA+F16C intrinsics when the translation unit is compiled with them
// (kernels_cpu_avx2.cpp), plain arrays the compiler vectorizes as it can otherwise. The kernels are written
// once against this header; it is the only place the two builds differ. Included inside the per-ISA
// namespace (see kernels_impl.h), so the two builds never share an inline symbol.
#ifndef QL_ISA_NS
#error "include through kernels_impl.h"
#endif

namespace qalora::cpu_isa::QL_ISA_NS {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QL_VEC8_AVX2 1
struct f8 { __m256 v; };
struct u8v { __m256i v; };
inline f8 f8_zero() { return {_mm256_setzero_ps()}; }
inline f8 f8_set1(float x) { return {_mm256_set1_ps(x)}; }
inline f8 f8_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void f8_store(float* p, f8 a) { _mm256_storeu_ps(p, a.v); }
inline f8 f8_add(f8 a, f8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline f8 f8_mul(f8 a, f8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
/// *p in every lane, as one broadcast load.
inline f8 f8_bcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
inline f8 f8_fma(f8 a, f8 b, f8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float f8_sum(f8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
/// Word *p in every lane (a broadcast load: no shuffle port on most x86 cores).
inline u8v u8_bcast(const uint32_t* p) { return {_mm256_set1_epi32((int)*p)}; }
/// The 8 bytes at p zero-extended, byte l to lane l.
inline u8v u8_bytes(const uint32_t* p) { return {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))}; }
inline u8v u8_setr(const int32_t* lanes) { return {_mm256_loadu_si256((const __m256i*)lanes)}; }
/// Eight words, word l to lane l.
inline u8v u8_load(const uint32_t* p) { return {_mm256_loadu_si256((const __m256i*)p)}; }
inline u8v u8_shr(u8v a, u8v count) { return {_mm256_srlv_epi32(a.v, count.v)}; }
template <int N>
inline u8v u8_shr_imm(u8v a) { return {_mm256_srli_epi32(a.v, N)}; }
/// *lo in lanes 0–3, *hi in lanes 4–7.
inline f8 f8_halves(const float* lo, const float* hi) {
  return {_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(lo)), _mm_broadcast_ss(hi), 1)};
}
inline u8v u8_shl(u8v a, int count) { return {_mm256_slli_epi32(a.v, count)}; }
inline u8v u8_and(u8v a, uint32_t m) { return {_mm256_and_si256(a.v, _mm256_set1_epi32((int)m))}; }
inline u8v u8_or(u8v a, u8v b) { return {_mm256_or_si256(a.v, b.v)}; }
inline f8 u8_to_f8(u8v a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline f8 f8_from_f16(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
/// Lanes 0 .. N−1 of a to p (N = 6: a 16-byte and an 8-byte store).
template <int N>
inline void f8_store_first(float* p, f8 a) {
  static_assert(N == 6, "only the GEMM's MR is needed");
  const __m128 hi = _mm256_extractf128_ps(a.v, 1);
  _mm_storeu_ps(p, _mm256_castps256_ps128(a.v));
  _mm_storel_pi(reinterpret_cast<__m64*>(p + 4), hi);
}
/// r[i] lane j ↔ r[j] lane i: eight rows of eight become eight columns.
inline void f8_transpose8(f8 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm256_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; i++) {
    r[i].v = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4].v = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
/// The same on 32-bit integer lanes (bit-exact shuffles): word t of eight rows' loads becomes vector t.
inline void u8_transpose8(u8v r[8]) {
  f8 f[8];
  for (int i = 0; i < 8; i++) f[i].v = _mm256_castsi256_ps(r[i].v);
  f8_transpose8(f);
  for (int i = 0; i < 8; i++) r[i].v = _mm256_castps_si256(f[i].v);
}
/// bf16 is the top half of an fp32: widened by a shift.
inline f8 f8_from_bf16(const uint16_t* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16))};
}
/// One stored scale (α or β) as fp32: fp16 bits through F16C's scalar convert.
inline float scale_f32(uint16_t h) { return _cvtsh_ss(h); }
inline void f8_to_f16(uint16_t* p, f8 a) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 32 bytes for the int8 GEMV: q of one 32-block (unsigned, or signed q − 128 at 8 bits) or its activations x_q.
struct b32 { __m256i v; };
inline b32 b32_load(const void* p) { return {_mm256_loadu_si256((const __m256i*)p)}; }
/// The 16 bytes at p as 32 nibbles: byte j < 16 the low nibble of byte j, byte 16 + j its high nibble.
inline b32 b32_nibbles(const void* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  return {_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0f))};
}
/// Four u32 vectors of values < 256 as bytes, in packus order: byte 16L + 4c + e is lane 4L + e of v[c].
inline b32 b32_pack(const u8v v[4]) {
  return {_mm256_packus_epi16(_mm256_packus_epi32(v[0].v, v[1].v), _mm256_packus_epi32(v[2].v, v[3].v))};
}
inline b32 b32_flip_sign(b32 a) { return {_mm256_xor_si256(a.v, _mm256_set1_epi8((char)0x80))}; }
/// Lane l = Σ of q·x over bytes 4l .. 4l+3, q unsigned ≤ 15 (pair sums stay inside int16), x signed.
inline f8 dot_u8s8(b32 q, b32 x) {
  const __m256i pairs = _mm256_maddubs_epi16(q.v, x.v);
  return {_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
/// The same for signed q: |q| (128 as an unsigned byte) times x carrying q's sign; |pair| ≤ 2·128·127 < 2^15.
inline f8 dot_s8s8(b32 q, b32 x) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q.v, q.v), _mm256_sign_epi8(x.v, q.v));
  return {_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
#else
struct f8 { float v[8]; };
struct u8v { uint32_t v[8]; };
#define QL_LANES(expr) for (int l = 0; l < 8; l++) expr
inline f8 f8_zero() { f8 r; QL_LANES(r.v[l] = 0.f); return r; }
inline f8 f8_set1(float x) { f8 r; QL_LANES(r.v[l] = x); return r; }
inline f8 f8_load(const float* p) { f8 r; QL_LANES(r.v[l] = p[l]); return r; }
inline void f8_store(float* p, f8 a) { QL_LANES(p[l] = a.v[l]); }
inline f8 f8_add(f8 a, f8 b) { QL_LANES(a.v[l] += b.v[l]); return a; }
inline f8 f8_mul(f8 a, f8 b) { QL_LANES(a.v[l] *= b.v[l]); return a; }
inline f8 f8_bcast(const float* p) { return f8_set1(*p); }
inline f8 f8_fma(f8 a, f8 b, f8 c) { QL_LANES(c.v[l] += a.v[l] * b.v[l]); return c; }
inline float f8_sum(f8 a) {
  return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7]));
}
inline u8v u8_bcast(const uint32_t* p) { u8v r; QL_LANES(r.v[l] = *p); return r; }
inline u8v u8_bytes(const uint32_t* p) {
  u8v r;
  QL_LANES(r.v[l] = (p[l / 4] >> (8 * (l % 4))) & 0xffu);
  return r;
}
inline u8v u8_setr(const int32_t* lanes) { u8v r; QL_LANES(r.v[l] = (uint32_t)lanes[l]); return r; }
inline u8v u8_load(const uint32_t* p) { u8v r; QL_LANES(r.v[l] = p[l]); return r; }
inline u8v u8_shr(u8v a, u8v count) { QL_LANES(a.v[l] >>= count.v[l]); return a; }
template <int N>
inline u8v u8_shr_imm(u8v a) { QL_LANES(a.v[l] >>= N); return a; }
inline f8 f8_halves(const float* lo, const float* hi) { f8 r; QL_LANES(r.v[l] = l < 4 ? *lo : *hi); return r; }
inline u8v u8_shl(u8v a, int count) { QL_LANES(a.v[l] <<= count); return a; }
inline u8v u8_and(u8v a, uint32_t m) { QL_LANES(a.v[l] &= m); return a; }
inline u8v u8_or(u8v a, u8v b) { QL_LANES(a.v[l] |= b.v[l]); return a; }
inline f8 u8_to_f8(u8v a) { f8 r; QL_LANES(r.v[l] = (float)a.v[l]); return r; }
inline f8 f8_from_f16(const uint16_t* p) { f8 r; QL_LANES(r.v[l] = f16_to_f32(p[l])); return r; }
template <int N>
inline void f8_store_first(float* p, f8 a) {
  for (int l = 0; l < N; l++) p[l] = a.v[l];
}
inline void f8_transpose8(f8 r[8]) {
  for (int i = 0; i < 8; i++)
    for (int j = i + 1; j < 8; j++) std::swap(r[i].v[j], r[j].v[i]);
}
inline void u8_transpose8(u8v r[8]) {
  for (int i = 0; i < 8; i++)
    for (int j = i + 1; j < 8; j++) std::swap(r[i].v[j], r[j].v[i]);
}
inline f8 f8_from_bf16(const uint16_t* p) { f8 r; QL_LANES(r.v[l] = bf16_to_f32(p[l])); return r; }
inline float scale_f32(uint16_t h) { return f16_to_f32(h); }
inline void f8_to_f16(uint16_t* p, f8 a) { QL_LANES(p[l] = f32_to_f16(a.v[l])); }
struct b32 { uint8_t v[32]; };
inline b32 b32_load(const void* p) { b32 r; std::memcpy(r.v, p, 32); return r; }
inline b32 b32_nibbles(const void* p) {
  const uint8_t* s = static_cast<const uint8_t*>(p);
  b32 r;
  for (int j = 0; j < 16; j++) {
    r.v[j] = s[j] & 0x0f;
    r.v[16 + j] = s[j] >> 4;
  }
  return r;
}
inline b32 b32_pack(const u8v v[4]) {
  b32 r;
  for (int j = 0; j < 32; j++) r.v[j] = (uint8_t)v[(j % 16) / 4].v[4 * (j / 16) + j % 4];
  return r;
}
inline b32 b32_flip_sign(b32 a) { QL_LANES(for (int e = 0; e < 4; e++) a.v[4 * l + e] ^= 0x80); return a; }
inline f8 dot_u8s8(b32 q, b32 x) {
  f8 r;
  QL_LANES({
    int32_t s = 0;
    for (int e = 4 * l; e < 4 * l + 4; e++) s += (int32_t)q.v[e] * (int8_t)x.v[e];
    r.v[l] = (float)s;
  });
  return r;
}
inline f8 dot_s8s8(b32 q, b32 x) {
  f8 r;
  QL_LANES({
    int32_t s = 0;
    for (int e = 4 * l; e < 4 * l + 4; e++) s += (int32_t)(int8_t)q.v[e] * (int8_t)x.v[e];
    r.v[l] = (float)s;
  });
  return r;
}
#undef QL_LANES
#endif
inline float scale_f32(float s) { return s; }
/// A hint to fetch the cache line at p into all cache levels (no fault on any address).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
/// Eight stored scales (α or β) as fp32.
inline f8 f8_scales(const float* p) { return f8_load(p); }
inline f8 f8_scales(const uint16_t* p) { return f8_from_f16(p); }

// ---- Activation storage: fp16 / bf16 rows to and from fp32 (fp32 rows are used in place) --------------------
struct Fp16 { using T = uint16_t; };
struct Bf16 { using T = uint16_t; };

inline void to_f32(Fp16, const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f8_store(dst + i, f8_from_f16(src + i));
  for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}
inline void to_f32(Bf16, const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}
inline void from_f32(Fp16, const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f8_to_f16(dst + i, f8_load(src + i));
  for (; i < n; i++) dst[i] = f32_to_f16(src[i]);
}
inline void from_f32(Bf16, const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace qalora::cpu_isa::QL_ISA_NS
