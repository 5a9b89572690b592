// Shared by the compiler/native/exec tests: hand-built specs and a scratch template root whose kernels are
// trivial but observable, so the pipeline (render → cmake-js → load) is tested apart from the real kernels.
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ResolvedLayer, ResolvedSpec } from '../dsl/resolved.ts';
import { repoRoot } from './fixtures.ts';

export function layer(name: string, over: Partial<ResolvedLayer> = {}): ResolvedLayer {
  return { name, inFeatures: 64, outFeatures: 16, bits: 4, group: 32, rank: 2, alpha: 4, dropout: 0, pool: 'mean', dtype: 'fp32', scales: 'fp32', count: 1, ...over };
}

export function spec(name: string, layers: ResolvedLayer[], cuda: string[] | null = null): ResolvedSpec {
  return { name, file: `/specs/${name}.qal`, layers, targets: { cpu: true, cuda: cuda ? { archs: cuda } : null } };
}

const tempDirs: string[] = [];
/** A fresh folder under the OS temp dir, removed by removeTempDirs() (call it in afterAll). */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `qalora-${prefix}-`));
  tempDirs.push(dir);
  return dir;
}
export function removeTempDirs(): void {
  for (const d of tempDirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

// Scratch kernels: each entry point writes something a test can predict from its inputs, proving the call
// reached the right specialization with the right arguments.
const SCRATCH_CPU = `#include "qalora_common.h"
{% for s in specializations %}
namespace qalora::cpu::{{ s.id }} {
void quantize(const float* w, int64_t out, int64_t in, uint32_t* q, void* alpha, void* beta) {
  q[0] = {{ s.bits }}; static_cast<float*>(alpha)[0] = w[0] + (float)out; static_cast<float*>(beta)[0] = (float)in;
}
void dequantize(const uint32_t* q, const void*, const void*, int64_t, int64_t, float* w) { w[0] = (float)q[0] + {{ s.group }}; }
void forward(const LayerArgs& a, const void*, void* y) {
{% if s.dtype == 'fp32' %}
  static_cast<float*>(y)[0] = (float)(a.m * 1000 + a.rank) + a.scale;
{% else %}
  static_cast<uint16_t*>(y)[0] = (uint16_t)(a.m + a.rank);
{% endif %}
}
void backward(const LayerArgs& a, const void*, const void*, void*, float* ga, float*) { if (a.rank) ga[0] = a.pool_scale; }
void merge(const LayerArgs& a, void* beta_out) {
  static_cast<float*>(beta_out)[0] = static_cast<const float*>(a.beta)[0] + (a.training ? 1.f : 0.f) + (float)a.seed;
}
}  // namespace qalora::cpu::{{ s.id }}
{% endfor %}
`;

const SCRATCH_CORE = `#include <cstdint>
namespace qalora::core {
double sum_f32(const float* x, int64_t n) { double s = 0; for (int64_t i = 0; i < n; i++) s += x[i]; return s; }
void fill_u16(uint16_t* y, int64_t n, int32_t v) { for (int64_t i = 0; i < n; i++) y[i] = (uint16_t)v; }
}
`;

const SCRATCH_OPS = [
  { name: 'sum_f32', doc: 'sum of x', cpp: 'qalora::core::sum_f32', args: [{ name: 'x', type: 'f32[]', const: true, len: 'n' }, { name: 'n', type: 'i64' }], returns: 'f64' },
  { name: 'fill_u16', cpp: 'qalora::core::fill_u16', args: [{ name: 'y', type: 'u16[]' }, { name: 'n', type: 'i64' }, { name: 'v', type: 'i32' }], returns: 'void' },
];

// A CUDA file in the contract's shape: status() must say "unavailable" on a machine without a driver.
const SCRATCH_CU = `#include <string>
#include <cuda_runtime.h>
#include "qalora_common.h"
namespace qalora::cuda {
std::string status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string("unavailable: ") + cudaGetErrorString(err);
  if (count == 0) return "unavailable: no CUDA device";
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  return std::string("ok: ") + p.name + ", sm_" + std::to_string(p.major) + std::to_string(p.minor);
}
}  // namespace qalora::cuda
// A GPU backend's memory table (templates/common/device_memory.h), the plainest that works.
#include "device_memory.h"
namespace qalora::cuda::memory {
namespace {
void* alloc(size_t n) { void* p = nullptr; if (n) cudaMalloc(&p, n); return p; }
void release(void* p, size_t) { cudaFree(p); }
void upload(void* d, const void* s, size_t n) { cudaMemcpy(d, s, n, cudaMemcpyHostToDevice); }
void download(void* d, const void* s, size_t n) { cudaMemcpy(d, s, n, cudaMemcpyDeviceToHost); }
void copy(void* d, const void* s, size_t n) { cudaMemcpy(d, s, n, cudaMemcpyDeviceToDevice); }
void sync() { cudaDeviceSynchronize(); }
void trim() {}
PoolStats stats() { return {}; }
}  // namespace
const DeviceMemory& table() {
  static const DeviceMemory t{"cuda", alloc, release, upload, download, copy, sync, trim, stats};
  return t;
}
}  // namespace qalora::cuda::memory
{% for s in specializations %}
namespace qalora::cuda::{{ s.id }} {
__global__ void touch(float* a) { a[threadIdx.x] += 1.f; }
void quantize(const float*, int64_t, int64_t, uint32_t*, void*, void*) {}
void dequantize(const uint32_t*, const void*, const void*, int64_t, int64_t, float*) {}
void forward(const LayerArgs&, const void*, void*) {}
void backward(const LayerArgs&, const void*, const void*, void*, float*, float*) {}
void merge(const LayerArgs&, void*) {}
}
{% endfor %}
`;

/** A template root with the real common/, addon/ and cmake/ templates and scratch cpu/core (and cuda) ones. */
export function scratchTemplates(opts: { cuda?: boolean } = {}): string {
  const root = tempDir('templates');
  for (const d of ['common', 'addon', 'cmake']) cpSync(join(repoRoot, 'templates', d), join(root, d), { recursive: true });
  mkdirSync(join(root, 'cpu'));
  mkdirSync(join(root, 'core'));
  writeFileSync(join(root, 'cpu', 'kernels.cpp.njk'), SCRATCH_CPU);
  writeFileSync(join(root, 'core', 'scratch.cpp'), SCRATCH_CORE);
  writeFileSync(join(root, 'core', 'scratch.ops.json'), JSON.stringify(SCRATCH_OPS));
  if (opts.cuda) {
    mkdirSync(join(root, 'cuda'));
    writeFileSync(join(root, 'cuda', 'kernels.cu.njk'), SCRATCH_CU);
  }
  return root;
}
