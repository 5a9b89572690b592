// Test kernels for the CUDA emulator (templates/emu), written as ordinary CUDA. `kernels <case> [n]` runs one
// case and checks it against a host reference computed independently; prints "ok <case>" or
// "FAIL <case>: ..." (exit 1). Lines tagged `// @name` are what test/emu.test.ts edits to make the broken
// variants the emulator must catch.
#include "cuda_emu.h"
#include "emu_counters.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int failures = 0;
#define CHECK(cond, ...)                     \
  do {                                       \
    if (!(cond)) {                           \
      if (failures++ < 5) {                  \
        fprintf(stdout, "FAIL %s: ", g_case); \
        fprintf(stdout, __VA_ARGS__);        \
        fputc('\n', stdout);                 \
      }                                      \
    }                                        \
  } while (0)
static const char* g_case = "";

template <class T>
T* to_device(const std::vector<T>& h) {
  T* d;
  cudaMalloc(&d, h.size() * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}
template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}
static float frand(uint32_t& s) {
  s = s * 1664525u + 1013904223u;
  return (float)(s >> 8) / 16777216.0f * 2.0f - 1.0f;
}
static std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  for (auto& x : v) x = frand(seed);
  return v;
}

// ---- 1-3D grids -----------------------------------------------------------------------------------------------
__global__ void vadd(const float* a, const float* b, float* c, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];  // @vadd-bound
}

__global__ void vadd3d(const float* a, const float* b, float* c, int nx, int ny, int nz) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int z = blockIdx.z * blockDim.z + threadIdx.z;
  if (x < nx && y < ny && z < nz) {
    const int i = (z * ny + y) * nx + x;
    c[i] = a[i] + b[i] * (float)(gridDim.x * 0 + 1);
  }
}

static void case_vadd(int n) {
  auto a = random_vec(n, 1), b = random_vec(n, 2);
  float *da = to_device(a), *db = to_device(b), *dc;
  cudaMalloc(&dc, n * sizeof(float));
  QL_LAUNCH(vadd, (n + 127) / 128, 128, 0, 0)(da, db, dc, n);
  CHECK(cudaGetLastError() == cudaSuccess, "launch failed");
  auto c = to_host(dc, n);
  for (int i = 0; i < n; i++) CHECK(c[i] == a[i] + b[i], "c[%d] = %g, want %g", i, c[i], a[i] + b[i]);
  cudaFree(da), cudaFree(db), cudaFree(dc);
}

static void case_vadd_dims() {
  const int nx = 37, ny = 11, nz = 5, n = nx * ny * nz;
  auto a = random_vec(n, 3), b = random_vec(n, 4);
  float *da = to_device(a), *db = to_device(b), *dc;
  cudaMalloc(&dc, n * sizeof(float));
  const dim3 shapes[][2] = {{dim3((n + 63) / 64), dim3(64)},
                            {dim3((nx + 7) / 8, (ny + 3) / 4), dim3(8, 4)},
                            {dim3((nx + 15) / 16, (ny + 3) / 4, (nz + 1) / 2), dim3(16, 4, 2)}};
  for (int s = 0; s < 3; s++) {
    cudaMemset(dc, 0, n * sizeof(float));
    if (s == 0)
      QL_LAUNCH(vadd, shapes[s][0], shapes[s][1], 0, 0)(da, db, dc, n);
    else if (s == 1)
      for (int z = 0; z < nz; z++)  // 2D: one launch per z slice
        QL_LAUNCH(vadd3d, shapes[s][0], shapes[s][1], 0, 0)(da + z * nx * ny, db + z * nx * ny, dc + z * nx * ny, nx, ny, 1);
    else
      QL_LAUNCH(vadd3d, shapes[s][0], shapes[s][1], 0, 0)(da, db, dc, nx, ny, nz);
    auto c = to_host(dc, n);
    for (int i = 0; i < n; i++) CHECK(c[i] == a[i] + b[i], "%dD: c[%d] = %g, want %g", s + 1, i, c[i], a[i] + b[i]);
  }
  cudaFree(da), cudaFree(db), cudaFree(dc);
}

// ---- Shuffles, votes, reductions --------------------------------------------------------------------------------
__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float warp_sums[32];
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) s += x[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) atomicAdd(out, s);
  }
}

// Per-lane results of the other shuffle flavours, for the host to recompute.
__global__ void shuffles(const int* x, int* scan, int* bcast8, int* up_w16, int* idx_any) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  int v = x[i];
  for (int d = 1; d < 32; d <<= 1) {  // inclusive scan
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  scan[i] = v;
  bcast8[i] = __shfl_sync(0xffffffffu, x[i], 3, 8);     // lane 3 of each group of 8
  up_w16[i] = __shfl_up_sync(0xffffffffu, x[i], 2, 16);  // within halves: unchanged for the first 2
  idx_any[i] = __shfl_sync(0xffffffffu, x[i], 37);       // 37 mod 32 = lane 5
}

__global__ void votes(const float* x, unsigned* ballot, int* any, int* all, int* count, unsigned* half_ballot) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool p = x[i] > 0.f;
  ballot[i] = __ballot_sync(0xffffffffu, p);
  any[i] = __any_sync(0xffffffffu, x[i] > 0.9f);
  all[i] = __all_sync(0xffffffffu, x[i] > -0.99f);
  count[i] = __syncthreads_count(p);
  // The upper half-warp votes among itself only; the lower half skips.
  if (threadIdx.x % 32 >= 16) half_ballot[i] = __ballot_sync(0xffff0000u, p);
  else half_ballot[i] = 0;
  __syncwarp();
}

static void case_reduce() {
  const int n = 10000;
  auto x = random_vec(n, 5);
  double want = 0;
  for (float v : x) want += v;
  float* dx = to_device(x);
  float* dout;
  cudaMalloc(&dout, 4);
  cudaMemset(dout, 0, 4);
  QL_LAUNCH(block_sum, 8, 256, 0, 0)(dx, dout, n);
  const float got = to_host(dout, 1)[0];
  CHECK(fabs(got - want) < 1e-3, "sum %g, want %g", got, want);

  const int m = 256;
  std::vector<int> xi(m);
  for (int i = 0; i < m; i++) xi[i] = (i * 7919) % 101 - 50;
  int *dxi = to_device(xi), *d[4];
  for (auto& p : d) cudaMalloc(&p, m * 4);
  QL_LAUNCH(shuffles, 2, 128, 0, 0)(dxi, d[0], d[1], d[2], d[3]);
  auto scan = to_host(d[0], m), b8 = to_host(d[1], m), up = to_host(d[2], m), idx = to_host(d[3], m);
  for (int i = 0; i < m; i++) {
    const int w = i / 32 * 32, l = i % 32;
    int s = 0;
    for (int k = w; k <= i; k++) s += xi[k];
    CHECK(scan[i] == s, "scan[%d] = %d, want %d", i, scan[i], s);
    CHECK(b8[i] == xi[w + l / 8 * 8 + 3], "bcast8[%d]", i);
    CHECK(up[i] == (l % 16 >= 2 ? xi[i - 2] : xi[i]), "up_w16[%d] = %d", i, up[i]);
    CHECK(idx[i] == xi[w + 5], "idx_any[%d]", i);
  }
  cudaFree(dx), cudaFree(dout), cudaFree(dxi);
  for (auto p : d) cudaFree(p);
}

static void case_votes() {
  const int n = 192;
  auto x = random_vec(n, 6);
  float* dx = to_device(x);
  unsigned *db, *dh;
  int *dany, *dall, *dcount;
  cudaMalloc(&db, n * 4), cudaMalloc(&dh, n * 4), cudaMalloc(&dany, n * 4), cudaMalloc(&dall, n * 4),
      cudaMalloc(&dcount, n * 4);
  QL_LAUNCH(votes, 2, 96, 0, 0)(dx, db, dany, dall, dcount, dh);
  auto b = to_host(db, n), h = to_host(dh, n);
  auto an = to_host(dany, n), al = to_host(dall, n), cn = to_host(dcount, n);
  for (int i = 0; i < n; i++) {
    const int w = i / 32 * 32, blk = i / 96 * 96;
    unsigned bits = 0, hbits = 0;
    int any = 0, all = 1, count = 0;
    for (int l = 0; l < 32; l++) {
      bits |= (unsigned)(x[w + l] > 0.f) << l;
      if (l >= 16) hbits |= (unsigned)(x[w + l] > 0.f) << l;
      any |= x[w + l] > 0.9f;
      all &= x[w + l] > -0.99f;
    }
    for (int k = blk; k < blk + 96; k++) count += x[k] > 0.f;
    CHECK(b[i] == bits, "ballot[%d] = %08x, want %08x", i, b[i], bits);
    CHECK(h[i] == (i % 32 >= 16 ? hbits : 0u), "half ballot[%d] = %08x", i, h[i]);
    CHECK(an[i] == any && al[i] == all, "any/all[%d]", i);
    CHECK(cn[i] == count, "syncthreads_count[%d] = %d, want %d", i, cn[i], count);
  }
}

// ---- Atomics ---------------------------------------------------------------------------------------------------
__global__ void histogram(const int* x, int n, unsigned* bins, float* fsum, int* imax, unsigned long long* cas_sum) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomicAdd(&bins[x[i] % 16], 1u);
  atomicAdd(fsum, (float)(x[i] % 8));  // small integers: exact in any order
  atomicMax(imax, x[i]);
  unsigned long long old = *cas_sum, seen;
  do {  // an add built from atomicCAS
    seen = old;
    old = atomicCAS(cas_sum, seen, seen + (unsigned long long)x[i]);
  } while (old != seen);
}

static void case_atomics() {
  const int n = 5000;
  std::vector<int> x(n);
  for (int i = 0; i < n; i++) x[i] = (i * 2654435761u) % 100000;
  int* dx = to_device(x);
  unsigned* bins;
  float* fsum;
  int* imax;
  unsigned long long* cas;
  cudaMalloc(&bins, 64), cudaMalloc(&fsum, 4), cudaMalloc(&imax, 4), cudaMalloc(&cas, 8);
  cudaMemset(bins, 0, 64), cudaMemset(fsum, 0, 4), cudaMemset(imax, 0, 4), cudaMemset(cas, 0, 8);
  QL_LAUNCH(histogram, (n + 255) / 256, 256, 0, 0)(dx, n, bins, fsum, imax, cas);
  auto b = to_host(bins, 16);
  unsigned want[16] = {};
  double fs = 0;
  int mx = 0;
  unsigned long long cs = 0;
  for (int v : x) want[v % 16]++, fs += v % 8, mx = std::max(mx, v), cs += v;
  for (int k = 0; k < 16; k++) CHECK(b[k] == want[k], "bin %d = %u, want %u", k, b[k], want[k]);
  CHECK(to_host(fsum, 1)[0] == (float)fs, "float sum %g, want %g", to_host(fsum, 1)[0], fs);
  CHECK(to_host(imax, 1)[0] == mx, "max");
  CHECK(to_host(cas, 1)[0] == cs, "cas sum");
}

// ---- Tiled matmul, static and dynamic shared memory --------------------------------------------------------------
constexpr int TILE = 16;

__global__ void matmul_static(const float* A, const float* B, float* C, int M, int N, int K) {
  __shared__ float As[TILE][TILE];
  __shared__ float Bs[TILE][TILE];
  const int row = blockIdx.y * TILE + threadIdx.y, col = blockIdx.x * TILE + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += TILE) {
    As[threadIdx.y][threadIdx.x] = row < M && k0 + threadIdx.x < K ? A[row * K + k0 + threadIdx.x] : 0.f;
    Bs[threadIdx.y][threadIdx.x] = col < N && k0 + threadIdx.y < K ? B[(k0 + threadIdx.y) * N + col] : 0.f;
    __syncthreads();  // @sync-after-load
    for (int k = 0; k < TILE; k++) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];
    __syncthreads();  // @sync-before-overwrite
  }
  if (row < M && col < N) C[row * N + col] = acc;
}

// Dynamic shared memory, tile size from the launch; the B tile is stored transposed to vary the indexing.
__global__ void matmul_dynamic(const float* A, const float* B, float* C, int M, int N, int K) {
  QL_DYN_SMEM(float, smem);
  const int T = blockDim.x;
  float* As = smem;
  float* Bt = smem + T * T;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * T + ty, col = blockIdx.x * T + tx;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += T) {
    As[ty * T + tx] = row < M && k0 + tx < K ? A[row * K + k0 + tx] : 0.f;
    Bt[tx * T + ty] = col < N && k0 + ty < K ? B[(k0 + ty) * N + col] : 0.f;  // @smem-index
    __syncthreads();
    for (int k = 0; k < T; k++) acc += As[ty * T + k] * Bt[tx * T + k];
    __syncthreads();
  }
  if (row < M && col < N) C[row * N + col] = acc;
}

static void check_matmul(const std::vector<float>& a, const std::vector<float>& b, const float* dc, int M, int N, int K,
                         const char* what) {
  auto c = to_host(dc, (size_t)M * N);
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double s = 0;
      for (int k = 0; k < K; k++) s += (double)a[i * K + k] * b[k * N + j];
      CHECK(fabs(c[i * N + j] - s) < 1e-4 * (1 + fabs(s)), "%s C[%d][%d] = %g, want %g", what, i, j, c[i * N + j], s);
    }
}

static void case_matmul(bool dynamic) {
  const int M = 45, N = 38, K = 70;
  auto a = random_vec(M * K, 7), b = random_vec(K * N, 8);
  float *da = to_device(a), *db = to_device(b), *dc;
  cudaMalloc(&dc, M * N * 4);
  if (!dynamic) {
    QL_LAUNCH(matmul_static, dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), dim3(TILE, TILE), 0, 0)(da, db, dc, M, N, K);
    check_matmul(a, b, dc, M, N, K, "static");
  } else {
    for (int T : {8, 16, 32}) {
      QL_LAUNCH(matmul_dynamic, dim3((N + T - 1) / T, (M + T - 1) / T), dim3(T, T), 2 * T * T * sizeof(float), 0)(da, db, dc, M, N, K);
      CHECK(cudaGetLastError() == cudaSuccess, "launch T=%d", T);
      check_matmul(a, b, dc, M, N, K, "dynamic");
    }
  }
  cudaFree(da), cudaFree(db), cudaFree(dc);
}

// ---- Tensor-core twins: mma.sync m16n8k16 and ldmatrix -------------------------------------------------------------
// One warp: A (16x16, row-major) and B (16x8, k-major rows) staged in shared memory, A loaded with
// ldmatrix.x4, B with ldmatrix.x2.trans, C loaded per the accumulator layout, D = A*B + C stored back.
template <bool BF16>
__global__ void mma_tile(const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  __shared__ __align__(16) uint16_t As[16][16];
  __shared__ __align__(16) uint16_t Bs[16][8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) As[i / 16][i % 16] = A[i];
  for (int i = lane; i < 128; i += 32) Bs[i / 8][i % 8] = B[i];
  __syncwarp();
  uint32_t a[4], b[2];
  qlemu::ldmatrix_x4(a, &As[lane % 16][lane / 16 * 8]);
  qlemu::ldmatrix_x2_trans(b, &Bs[lane % 16][0]);
  const int g = lane >> 2, t = lane & 3;
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  if (BF16)
    qlemu::mma_m16n8k16_bf16(c, a, b, c);
  else
    qlemu::mma_m16n8k16_f16(c, a, b, c);
  D[g * 8 + 2 * t] = c[0], D[g * 8 + 2 * t + 1] = c[1], D[(g + 8) * 8 + 2 * t] = c[2], D[(g + 8) * 8 + 2 * t + 1] = c[3];
}

static uint16_t to_bits(float f, bool bf16) {
  if (bf16) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    return __bfloat16_as_ushort(h);
  }
  __half h = __float2half_rn(f);
  return __half_as_ushort(h);
}
static float from_bits(uint16_t u, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}

static void case_mma(bool bf16) {
  uint32_t s = bf16 ? 11 : 12;
  std::vector<uint16_t> a(256), b(128);
  std::vector<float> c(128);
  for (auto& v : a) v = to_bits(frand(s) * 4, bf16);
  for (auto& v : b) v = to_bits(frand(s) * 4, bf16);
  for (auto& v : c) v = frand(s);
  uint16_t *da = to_device(a), *db = to_device(b);
  float *dc = to_device(c), *dd;
  cudaMalloc(&dd, 128 * 4);
  if (bf16)
    QL_LAUNCH(mma_tile<true>, 1, 32, 0, 0)(da, db, dc, dd);
  else
    QL_LAUNCH(mma_tile<false>, 1, 32, 0, 0)(da, db, dc, dd);
  auto d = to_host(dd, 128);
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 8; j++) {
      double r = c[i * 8 + j];
      for (int k = 0; k < 16; k++) r += (double)from_bits(a[i * 16 + k], bf16) * from_bits(b[k * 8 + j], bf16);
      CHECK(fabs(d[i * 8 + j] - r) < 1e-5 * (1 + fabs(r)), "D[%d][%d] = %g, want %g", i, j, d[i * 8 + j], r);
    }
}

// ldmatrix alone: matrix j's row i at lane 8j+i's address (rows scattered with a stride of 24 elements).
__global__ void ldmatrix_all(const uint16_t* src, uint32_t* out) {
  __shared__ __align__(16) uint16_t m[32 * 24];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 24; i += 32) m[i] = src[i];
  __syncwarp();
  const void* row = &m[lane * 24];
  uint32_t r[4];
  qlemu::ldmatrix_x1(r, row), out[0 * 32 + lane] = r[0];
  qlemu::ldmatrix_x2(r, row), out[1 * 32 + lane] = r[0], out[2 * 32 + lane] = r[1];
  qlemu::ldmatrix_x4(r, row);
  for (int j = 0; j < 4; j++) out[(3 + j) * 32 + lane] = r[j];
  qlemu::ldmatrix_x1_trans(r, row), out[7 * 32 + lane] = r[0];
  qlemu::ldmatrix_x2_trans(r, row), out[8 * 32 + lane] = r[0], out[9 * 32 + lane] = r[1];
  qlemu::ldmatrix_x4_trans(r, row);
  for (int j = 0; j < 4; j++) out[(10 + j) * 32 + lane] = r[j];
}

static void case_ldmatrix() {
  std::vector<uint16_t> src(32 * 24);
  for (size_t i = 0; i < src.size(); i++) src[i] = (uint16_t)(i * 37 + 5);
  uint16_t* ds = to_device(src);
  uint32_t* dout;
  cudaMalloc(&dout, 14 * 32 * 4);
  QL_LAUNCH(ldmatrix_all, 1, 32, 0, 0)(ds, dout);
  auto out = to_host(dout, 14 * 32);
  // PTX ISA: thread l holds row l/4, elements 2(l%4) and 2(l%4)+1 of each 8x8 matrix (transposed: column l/4).
  auto elem = [&](int mat, int r, int c) { return (uint32_t)src[(8 * mat + r) * 24 + c]; };
  const int first[2][3] = {{0, 1, 3}, {7, 8, 10}}, count[3] = {1, 2, 4};
  for (int tr = 0; tr < 2; tr++)
    for (int v = 0; v < 3; v++)
      for (int j = 0; j < count[v]; j++)
        for (int l = 0; l < 32; l++) {
          const int q = l / 4, e = 2 * (l % 4);
          const uint32_t want = tr ? elem(j, e, q) | elem(j, e + 1, q) << 16 : elem(j, q, e) | elem(j, q, e + 1) << 16;
          CHECK(out[(first[tr][v] + j) * 32 + l] == want, "ldmatrix x%d%s reg %d lane %d = %08x, want %08x", count[v],
                tr ? ".trans" : "", j, l, out[(first[tr][v] + j) * 32 + l], want);
        }
}

// ---- cp.async: a double-buffered pipeline (tile t+1 in flight while tile t is summed) ---------------------------------
constexpr int PIPE_TILE = 128;  // floats per tile; each of 32 threads copies 16 bytes

__global__ void pipeline_sum(const float* x, int tiles, float* out) {
  __shared__ __align__(16) float buf[2][PIPE_TILE];
  const int t = threadIdx.x;
  qlemu::cp_async(&buf[0][4 * t], &x[4 * t], 16);
  qlemu::cp_async_commit();
  float acc = 0.f;
  for (int k = 0; k < tiles; k++) {
    if (k + 1 < tiles) qlemu::cp_async(&buf[(k + 1) & 1][4 * t], &x[(k + 1) * PIPE_TILE + 4 * t], 16);
    qlemu::cp_async_commit();
    qlemu::cp_async_wait(1);  // @cp-wait
    __syncthreads();
    for (int i = 0; i < PIPE_TILE; i++) acc += buf[k & 1][i] * (float)(i == t);  // each thread sums its own column
    acc += buf[k & 1][(t + 64) % PIPE_TILE];
    __syncthreads();
  }
  out[t] = acc;
}

// cp.async with a partial source: the rest of the 16 bytes is zero-filled.
__global__ void zfill(const float* x, float* out) {
  __shared__ __align__(16) float s[4 * 32];
  const int t = threadIdx.x;
  qlemu::cp_async_zfill(&s[4 * t], &x[4 * t], 16, 4 * (t % 5 > 3 ? 4 : t % 5));
  qlemu::cp_async_commit();
  qlemu::cp_async_wait(0);
  for (int i = 0; i < 4; i++) out[4 * t + i] = s[4 * t + i];
}

static void case_cp_async() {
  const int tiles = 9;
  auto x = random_vec(tiles * PIPE_TILE, 9);
  float *dx = to_device(x), *dout;
  cudaMalloc(&dout, 32 * 4);
  QL_LAUNCH(pipeline_sum, 1, 32, 0, 0)(dx, tiles, dout);
  auto out = to_host(dout, 32);
  for (int t = 0; t < 32; t++) {
    float want = 0.f;
    for (int k = 0; k < tiles; k++) want += x[k * PIPE_TILE + t], want += x[k * PIPE_TILE + (t + 64) % PIPE_TILE];
    CHECK(fabs(out[t] - want) < 1e-5, "thread %d: %g, want %g", t, out[t], want);
  }
  float* dz;
  cudaMalloc(&dz, 128 * 4);
  QL_LAUNCH(zfill, 1, 32, 0, 0)(dx, dz);
  auto z = to_host(dz, 128);
  for (int t = 0; t < 32; t++)
    for (int i = 0; i < 4; i++) {
      const int n = t % 5 > 3 ? 4 : t % 5;
      CHECK(z[4 * t + i] == (i < n ? x[4 * t + i] : 0.f), "zfill[%d][%d]", t, i);
    }
}

// ---- Lane-local PTX twins ------------------------------------------------------------------------------------------
static void case_bits() {
  uint32_t s = 99;
  for (int it = 0; it < 200; it++) {
    s = s * 1664525u + 1013904223u;
    const uint32_t a = s, b = s * 2654435761u, c = ~s ^ (s << 7);
    // A LUT built by applying an expression to PTX's 0xF0/0xCC/0xAA selects the same expression.
    CHECK(qlemu::lop3(a, b, c, (0xF0 & 0xCC) | 0xAA) == ((a & b) | c), "lop3 (a&b)|c");
    CHECK(qlemu::lop3(a, b, c, 0xF0 ^ 0xCC ^ 0xAA) == (a ^ b ^ c), "lop3 xor3");
    CHECK(qlemu::lop3(a, b, c, (0xF0 & ~0xCC & 0xff) | (0xCC & 0xAA)) == ((a & ~b) | (b & c)), "lop3 mux");
    const uint8_t ab[8] = {(uint8_t)a, (uint8_t)(a >> 8), (uint8_t)(a >> 16), (uint8_t)(a >> 24),
                           (uint8_t)b, (uint8_t)(b >> 8), (uint8_t)(b >> 16), (uint8_t)(b >> 24)};
    const uint32_t sel = c & 0x7777;
    uint32_t want = 0;
    for (int i = 0; i < 4; i++) want |= (uint32_t)ab[sel >> (4 * i) & 7] << (8 * i);
    CHECK(qlemu::prmt(a, b, sel) == want, "prmt %08x", sel);
    CHECK(__byte_perm(a, b, sel) == want, "__byte_perm");
  }
  CHECK(qlemu::prmt(0x00800000u, 0, 0xa210) == 0xff800000u, "prmt sign replicate");
}

// ---- Launch configuration errors ------------------------------------------------------------------------------------
static void case_launch_errors() {
  float* d;
  cudaMalloc(&d, 1024 * 4);
  QL_LAUNCH(vadd, 1, 2048, 0, 0)(d, d, d, 1);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048-thread block accepted");
  CHECK(cudaGetLastError() == cudaSuccess, "last error not cleared");
  QL_LAUNCH(vadd, dim3(1, 70000), 32, 0, 0)(d, d, d, 1);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y 70000 accepted");
  const size_t big = 2 * 64 * 64 * sizeof(float);  // 32 KB: fine; 64x64 tiles of two matrices
  QL_LAUNCH(matmul_dynamic, 1, dim3(16, 16), 64 * 1024, 0)(d, d, d, 0, 0, 0);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue, "64 KB dynamic smem accepted without the attribute");
  CHECK(cudaFuncSetAttribute(matmul_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024) == cudaSuccess,
        "attribute refused");
  QL_LAUNCH(matmul_dynamic, 1, dim3(16, 16), 64 * 1024 + big, 0)(d, d, d, 0, 0, 0);
  CHECK(cudaGetLastError() == cudaSuccess, "dynamic smem under the raised limit refused");
  CHECK(cudaFuncSetAttribute(matmul_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 400 * 1024) ==
            cudaErrorInvalidValue,
        "400 KB limit accepted");
  int n = 0;
  cudaDeviceProp p;
  CHECK(cudaGetDeviceCount(&n) == cudaSuccess && n == 1, "device count");
  CHECK(cudaGetDeviceProperties(&p, 0) == cudaSuccess && strcmp(p.name, "qalora CUDA emulator") == 0, "name");
  cudaGetLastError();
}

// ---- Vector loads and stores: 16 and 8 bytes through pointer casts, as kernels widen their accesses -------------
// On a GPU a misaligned vector access faults ("misaligned address"); under the emulator -fsanitize=alignment
// checks each cast access against its type's alignment (the alignment nvcc picks the vector width from).
__global__ void copy_vec16(const float* in, float* out, int n) {
  const int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) *reinterpret_cast<uint4*>(out + i) = *reinterpret_cast<const uint4*>(in + i);  // @vec16
}
__global__ void copy_vec8(const float* in, float* out, int n) {
  const int i = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) reinterpret_cast<float2*>(out)[i / 2] = *reinterpret_cast<const float2*>(in + i);  // @vec8
}

static void case_vectors() {
  const int n = 256;
  auto a = random_vec(n + 4, 7);
  float *din = to_device(a), *dout;
  cudaMalloc(&dout, n * sizeof(float));
  const int off16 = 4;  // @vec16-offset
  const int off8 = 2;   // @vec8-offset
  QL_LAUNCH(copy_vec16, 1, n / 4, 0, 0)(din + off16, dout, n);
  auto o16 = to_host(dout, n);
  for (int i = 0; i < n; i++) CHECK(o16[i] == a[off16 + i], "16-byte copy: out[%d]", i);
  QL_LAUNCH(copy_vec8, 1, n / 2, 0, 0)(din + off8, dout, n);
  auto o8 = to_host(dout, n);
  for (int i = 0; i < n; i++) CHECK(o8[i] == a[off8 + i], "8-byte copy: out[%d]", i);
  cudaFree(din), cudaFree(dout);
}

// ---- The runtime API's bookkeeping: exact transfer counters, and the misuses a GPU rejects -------------------------
static void case_counters() {
  qlemu::reset_counters();
  float *a, *b;
  cudaMalloc(&a, 1000 * sizeof(float));
  cudaMalloc(&b, 6 * sizeof(float));
  const std::vector<float> h(1000, 1.0f);
  cudaMemcpy(a, h.data(), 1000 * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpyAsync(b, a + 10, 6 * sizeof(float), cudaMemcpyDeviceToDevice);  // not a host stall
  cudaMemcpyAsync(a, h.data(), 5 * sizeof(float), cudaMemcpyDefault);       // direction from the pointers
  QL_LAUNCH(vadd, 1, 32, 0, 0)(b, b, b, 6);
  QL_LAUNCH(vadd, 1, 2048, 0, 0)(b, b, b, 6);  // refused: not a launch
  cudaGetLastError();
  auto back = to_host(b, 6);
  cudaDeviceSynchronize();
  cudaFree(a), cudaFree(b);
  const qlemu::Counters c = qlemu::counters();
  CHECK(c.h2d_calls == 2 && c.h2d_bytes == 4020, "h2d %llu calls %llu bytes", (unsigned long long)c.h2d_calls,
        (unsigned long long)c.h2d_bytes);
  CHECK(c.d2d_calls == 1 && c.d2d_bytes == 24, "d2d %llu calls %llu bytes", (unsigned long long)c.d2d_calls,
        (unsigned long long)c.d2d_bytes);
  CHECK(c.d2h_calls == 1 && c.d2h_bytes == 24, "d2h %llu calls %llu bytes", (unsigned long long)c.d2h_calls,
        (unsigned long long)c.d2h_bytes);
  CHECK(c.allocs == 2 && c.alloc_bytes == 4024 && c.frees == 2, "allocs %llu (%llu bytes), frees %llu",
        (unsigned long long)c.allocs, (unsigned long long)c.alloc_bytes, (unsigned long long)c.frees);
  CHECK(c.syncs == 3, "syncs %llu: one blocking upload, one blocking readback, one cudaDeviceSynchronize",
        (unsigned long long)c.syncs);
  CHECK(c.launches == 1, "launches %llu", (unsigned long long)c.launches);
  CHECK(back[0] == 2.0f, "vadd on the copied values: %g", back[0]);
  qlemu::reset_counters();
  CHECK(qlemu::counters().h2d_bytes == 0 && qlemu::counters().syncs == 0, "reset");
}

static void case_api_misuse() {
  float *d, h[8] = {};
  cudaMalloc(&d, 8 * sizeof(float));
  CHECK(cudaMemcpy(h, d, sizeof h, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "kind against the pointers");
  CHECK(cudaMemcpy(d + 4, h, sizeof h, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy past the block");
  CHECK(cudaMemset(h, 0, sizeof h) == cudaErrorInvalidValue, "memset of host memory");
  CHECK(cudaFree(d + 1) == cudaErrorInvalidValue, "free inside a block");
  CHECK(cudaFree(d) == cudaSuccess, "free");
  CHECK(cudaFree(d) == cudaErrorInvalidValue, "double free");
  CHECK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue, "copy from a freed block");
  cudaGetLastError();
}

// Broken as written: reads a buffer after cudaFree. The emulator poisons freed blocks, so it reads NaN.
__global__ void read_back(const float* x, float* out) {
  out[threadIdx.x] = x[threadIdx.x];  // @after-free
}

static void case_use_after_free() {
  float *d = to_device(random_vec(32, 9)), *out;
  cudaMalloc(&out, 32 * sizeof(float));
  cudaFree(d);
  QL_LAUNCH(read_back, 1, 32, 0, 0)(d, out);
  auto got = to_host(out, 32);
  for (int i = 0; i < 32; i++) {
    uint32_t bits;
    memcpy(&bits, &got[i], 4);
    CHECK(bits == 0x7fff7fffu && std::isnan(got[i]), "freed memory read %08x", bits);
    const uint32_t half = bits & 0xffff;  // fp16 (and bf16) readers see NaN too
    CHECK((half >> 10 & 0x1f) == 0x1f && (half & 0x3ff) != 0, "poison is not an fp16 NaN");
  }
  if (!failures) printf("read poison\n");
}

// ---- Two barriers in a row (a variant reaches the first from part of the block only) -------------------------------
__global__ void rotate_sum(float* x) {
  const int t = threadIdx.x;
  x[t] = (float)t;
  __syncthreads();  // @partial-barrier
  const float next = x[(t + 1) % blockDim.x];
  __syncthreads();
  x[t] += next;
}

static void case_rotate() {
  float* d;
  cudaMalloc(&d, 64 * 4);
  QL_LAUNCH(rotate_sum, 1, 64, 0, 0)(d);
  auto x = to_host(d, 64);
  for (int t = 0; t < 64; t++) CHECK(x[t] == (float)(t + (t + 1) % 64), "x[%d] = %g", t, x[t]);
}

// Broken as written: lane 31 of each warp skips a full-mask shuffle.
__global__ void warp_deadlock(int* x) {
  if (threadIdx.x % 32 < 31) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
  __syncthreads();
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: kernels <case>\n");
    return 2;
  }
  const std::string c = argv[1];
  g_case = argv[1];
  if (c == "vadd") case_vadd(argc > 2 ? atoi(argv[2]) : 1000);
  else if (c == "vadd_dims") case_vadd_dims();
  else if (c == "reduce") case_reduce();
  else if (c == "votes") case_votes();
  else if (c == "atomics") case_atomics();
  else if (c == "matmul_static") case_matmul(false);
  else if (c == "matmul_dynamic") case_matmul(true);
  else if (c == "mma_f16") case_mma(false);
  else if (c == "mma_bf16") case_mma(true);
  else if (c == "ldmatrix") case_ldmatrix();
  else if (c == "cp_async") case_cp_async();
  else if (c == "bits") case_bits();
  else if (c == "launch_errors") case_launch_errors();
  else if (c == "rotate") case_rotate();
  else if (c == "vectors") case_vectors();
  else if (c == "counters") case_counters();
  else if (c == "api_misuse") case_api_misuse();
  else if (c == "use_after_free") case_use_after_free();
  else if (c == "warp_deadlock") {
    int* d;
    cudaMalloc(&d, 64 * 4);
    cudaMemset(d, 0, 64 * 4);
    QL_LAUNCH(warp_deadlock, 1, 64, 0, 0)(d);
  } else {
    fprintf(stderr, "unknown case %s\n", argv[1]);
    return 2;
  }
  if (failures) return 1;
  printf("ok %s\n", argv[1]);
  return 0;
}
