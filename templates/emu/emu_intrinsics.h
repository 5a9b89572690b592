// Device intrinsics for emulated kernels. Blocking ones (barriers, warp collectives) are macros so each call
// carries its __FILE__/__LINE__ into deadlock reports; the rest are plain functions. Everything lives in
// qlemu::dev and is made visible with a using-directive, so no symbol can collide with a real CUDA build
// linked into the same addon.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_core.h"

#define QLEMU_SITE (::qlemu::Site{__FILE__, __LINE__})

// ---- Block barrier ----------------------------------------------------------------------------------------
#define __syncthreads() ::qlemu::syncthreads(QLEMU_SITE)
#define __syncthreads_count(pred) ::qlemu::syncthreads_reduce(QLEMU_SITE, (pred) != 0, 0)
#define __syncthreads_and(pred) ::qlemu::syncthreads_reduce(QLEMU_SITE, (pred) != 0, 1)
#define __syncthreads_or(pred) ::qlemu::syncthreads_reduce(QLEMU_SITE, (pred) != 0, 2)

// ---- Warp collectives ---------------------------------------------------------------------------------------
#define __syncwarp(...) ::qlemu::dev::SyncWarp{QLEMU_SITE}(__VA_ARGS__)  // the mask is optional
#define __shfl_sync(...) ::qlemu::dev::shfl_at(QLEMU_SITE, ::qlemu::WarpOp::shfl_idx, "__shfl_sync", __VA_ARGS__)
#define __shfl_up_sync(...) ::qlemu::dev::shfl_at(QLEMU_SITE, ::qlemu::WarpOp::shfl_up, "__shfl_up_sync", __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::qlemu::dev::shfl_at(QLEMU_SITE, ::qlemu::WarpOp::shfl_down, "__shfl_down_sync", __VA_ARGS__)
#define __shfl_xor_sync(...) \
  ::qlemu::dev::shfl_at(QLEMU_SITE, ::qlemu::WarpOp::shfl_bfly, "__shfl_xor_sync", __VA_ARGS__)
#define __ballot_sync(mask, pred) ::qlemu::dev::vote_at(QLEMU_SITE, ::qlemu::WarpOp::ballot, "__ballot_sync", mask, pred)
#define __any_sync(mask, pred) (int)::qlemu::dev::vote_at(QLEMU_SITE, ::qlemu::WarpOp::any, "__any_sync", mask, pred)
#define __all_sync(mask, pred) (int)::qlemu::dev::vote_at(QLEMU_SITE, ::qlemu::WarpOp::all, "__all_sync", mask, pred)
#define __reduce_add_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_add, "__reduce_add_sync", mask, v)
#define __reduce_min_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_min, "__reduce_min_sync", mask, v)
#define __reduce_max_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_max, "__reduce_max_sync", mask, v)
#define __reduce_and_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_and, "__reduce_and_sync", mask, v)
#define __reduce_or_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_or, "__reduce_or_sync", mask, v)
#define __reduce_xor_sync(mask, v) ::qlemu::dev::reduce_at(QLEMU_SITE, ::qlemu::WarpOp::reduce_xor, "__reduce_xor_sync", mask, v)
#define __match_any_sync(mask, v) ::qlemu::dev::match_any_at(QLEMU_SITE, mask, v)
#define __match_all_sync(mask, v, pred) ::qlemu::dev::match_all_at(QLEMU_SITE, mask, v, pred)

namespace qlemu::dev {

struct SyncWarp {
  Site at;
  void operator()(unsigned mask = 0xffffffffu) const {
    warp_collective(at, WarpCall{WarpOp::syncwarp, mask, nullptr, nullptr, 0, 0, 0, "__syncwarp"});
  }
};

template <class T>
T shfl_at(Site at, WarpOp op, const char* what, unsigned mask, T var, int lane_or_delta, int width = 32) {
  T result = var;
  warp_collective(at, WarpCall{op, mask, &var, &result, (int)sizeof(T), lane_or_delta, width, what});
  return result;
}

inline unsigned vote_at(Site at, WarpOp op, const char* what, unsigned mask, int pred) {
  const int p = pred != 0;
  unsigned r = 0;
  warp_collective(at, WarpCall{op, mask, &p, &r, 4, 0, 0, what});
  return r;
}

template <class T>
T reduce_at(Site at, WarpOp op, const char* what, unsigned mask, T v) {
  static_assert(std::is_same<T, int>::value || std::is_same<T, unsigned>::value,
                "__reduce_*_sync takes int or unsigned");
  T r = v;
  warp_collective(at, WarpCall{op, mask, &v, &r, 4, std::is_signed<T>::value, 0, what});
  return r;
}

template <class T>
unsigned match_any_at(Site at, unsigned mask, T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  unsigned r = 0;
  warp_collective(at, WarpCall{WarpOp::match_any, mask, &v, &r, (int)sizeof(T), 0, 0, "__match_any_sync"});
  return r;
}

template <class T>
unsigned match_all_at(Site at, unsigned mask, T v, int* pred) {
  const unsigned same = match_any_at(at, mask, v);
  *pred = same == mask;
  return same == mask ? mask : 0;
}

// ---- Atomics (relaxed, like CUDA's; real atomics because blocks run on several OS threads) ---------------------
template <class T, class F>
T atomic_update(T* p, F f) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(T) == sizeof(U), "atomic on an unsupported type size");
  U* q = reinterpret_cast<U*>(p);
  U old_bits = __atomic_load_n(q, __ATOMIC_RELAXED), new_bits;
  T old_value;
  do {
    memcpy(static_cast<void*>(&old_value), &old_bits, sizeof(T));
    const T next = f(old_value);
    memcpy(&new_bits, &next, sizeof(T));
  } while (!__atomic_compare_exchange_n(q, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old_value;
}

#define QLEMU_INT_ATOMICS(T)                                                                               \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                      \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicMax(T* p, T v) { return atomic_update(p, [v](T o) { return o > v ? o : v; }); }          \
  inline T atomicMin(T* p, T v) { return atomic_update(p, [v](T o) { return o < v ? o : v; }); }          \
  inline T atomicCAS(T* p, T compare, T v) {                                                             \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);               \
    return compare;                                                                                       \
  }
QLEMU_INT_ATOMICS(int)
QLEMU_INT_ATOMICS(unsigned)
QLEMU_INT_ATOMICS(unsigned long long)
QLEMU_INT_ATOMICS(long long)
#undef QLEMU_INT_ATOMICS

inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return atomic_update(p, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}
inline float atomicAdd(float* p, float v) { return atomic_update(p, [v](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return atomic_update(p, [v](double o) { return o + v; }); }
inline float atomicExch(float* p, float v) { return atomic_update(p, [v](float) { return v; }); }
inline __half atomicAdd(__half* p, __half v) { return atomic_update(p, [v](__half o) { return __hadd(o, v); }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return atomic_update(p, [v](__nv_bfloat16 o) { return __hadd(o, v); });
}
inline __half2 atomicAdd(__half2* p, __half2 v) { return atomic_update(p, [v](__half2 o) { return __hadd2(o, v); }); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- Cache-hinted loads and stores: plain memory here ----------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---- Math ------------------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x), *c = cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float exp10f(float x) { return powf(10.f, x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : (x == x ? x : 0.f); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }

template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)a < (C)b ? (C)b : (C)a;
}

// ---- Integer bit tricks ------------------------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
  x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
  x = (x >> 4 & 0x0f0f0f0fu) | (x & 0x0f0f0f0fu) << 4;
  return __builtin_bswap32(x);
}
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) { return prmt(a, b, s & 0x7777u); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)((((unsigned long long)hi << 32 | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned s) {
  return s >= 32 ? hi : __funnelshift_l(lo, hi, s);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)(((unsigned long long)hi << 32 | lo) >> (s & 31));
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s) {
  return s >= 32 ? hi : __funnelshift_r(lo, hi, s);
}
inline int __mul24(int a, int b) { return (int)((long long)(a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return (int)((long long)a * b >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)((unsigned long long)a * b >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)((__int128)a * b >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}

// ---- fp16 / bf16 operations cuda_fp16.h / cuda_bf16.h declare for device code only -------------------------------
// Computed in float (products of 16-bit floats and their sums are exact in double) and rounded once.
#define QLEMU_HALF_OPS(H, H2, TO_F, FROM_F, FROM_D, PREFIX)                                                   \
  inline H __hfma(H a, H b, H c) { return FROM_D((double)TO_F(a) * TO_F(b) + TO_F(c)); }                     \
  inline H __hfma_relu(H a, H b, H c) {                                                                       \
    const double r = (double)TO_F(a) * TO_F(b) + TO_F(c);                                                     \
    return FROM_D(r < 0 ? 0.0 : r);                                                                           \
  }                                                                                                           \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }            \
  inline H hexp(H x) { return FROM_F(expf(TO_F(x))); }                                                        \
  inline H hexp2(H x) { return FROM_F(exp2f(TO_F(x))); }                                                      \
  inline H hlog(H x) { return FROM_F(logf(TO_F(x))); }                                                        \
  inline H hlog2(H x) { return FROM_F(log2f(TO_F(x))); }                                                      \
  inline H hsqrt(H x) { return FROM_F(sqrtf(TO_F(x))); }                                                      \
  inline H hrsqrt(H x) { return FROM_F(1.0f / sqrtf(TO_F(x))); }                                              \
  inline H hrcp(H x) { return FROM_F(1.0f / TO_F(x)); }                                                       \
  inline H htanh(H x) { return FROM_F(tanhf(TO_F(x))); }                                                      \
  inline H hsin(H x) { return FROM_F(sinf(TO_F(x))); }                                                        \
  inline H hcos(H x) { return FROM_F(cosf(TO_F(x))); }                                                        \
  inline H hfloor(H x) { return FROM_F(floorf(TO_F(x))); }                                                    \
  inline H hceil(H x) { return FROM_F(ceilf(TO_F(x))); }                                                      \
  inline H hrint(H x) { return FROM_F(nearbyintf(TO_F(x))); }                                                 \
  inline H htrunc(H x) { return FROM_F(truncf(TO_F(x))); }                                                    \
  inline H2 h2exp(H2 x) { return H2(hexp(x.x), hexp(x.y)); }                                                  \
  inline H2 h2sqrt(H2 x) { return H2(hsqrt(x.x), hsqrt(x.y)); }                                               \
  inline H2 h2rsqrt(H2 x) { return H2(hrsqrt(x.x), hrsqrt(x.y)); }                                            \
  inline H2 h2rcp(H2 x) { return H2(hrcp(x.x), hrcp(x.y)); }                                                  \
  inline int PREFIX##2int_rn(H x) { return (int)nearbyintf(TO_F(x)); }                                       \
  inline int PREFIX##2int_rd(H x) { return (int)floorf(TO_F(x)); }                                           \
  inline int PREFIX##2int_ru(H x) { return (int)ceilf(TO_F(x)); }                                            \
  inline unsigned PREFIX##2uint_rn(H x) { return (unsigned)nearbyintf(TO_F(x)); }                             \
  inline short PREFIX##2short_rn(H x) { return (short)nearbyintf(TO_F(x)); }                                  \
  inline unsigned short PREFIX##2ushort_rn(H x) { return (unsigned short)nearbyintf(TO_F(x)); }               \
  inline long long PREFIX##2ll_rn(H x) { return (long long)nearbyintf(TO_F(x)); }

inline __nv_bfloat16 qlemu_double2bfloat16(double d) { return __float2bfloat16_rn((float)d); }
QLEMU_HALF_OPS(__half, __half2, __half2float, __float2half_rn, __double2half, __half)
QLEMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162, __bfloat162float, __float2bfloat16_rn, qlemu_double2bfloat16, __bfloat16)
#undef QLEMU_HALF_OPS

// ---- Miscellaneous ---------------------------------------------------------------------------------------------
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
inline void __nanosleep(unsigned) {}
#define __trap() ::qlemu::fatal_in_kernel(QLEMU_SITE, "__trap() called")

}  // namespace qlemu::dev

using namespace qlemu::dev;
