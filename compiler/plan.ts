// Stage 1: ResolvedSpec → KernelPlan. Layers sharing (bits, group, dtype, pool, scales) share one specialization;
// per target the plan picks CPU cache blocking and CUDA tile/launch configurations for it.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { poolScale, type ActDType, type ResolvedSpec } from '../dsl/resolved.ts';
import type { CpuConfig, CudaConfig, KernelPlan, PlannedLayer, Specialization, SpecializationKey } from './ir.ts';

export const compilerVersion: string = JSON.parse(
  readFileSync(new URL('../package.json', import.meta.url), 'utf8'),
).version;

// fp32 scales add nothing to the id, so every id that existed before `scales` keeps its name.
export function specializationId(k: SpecializationKey): string {
  return `b${k.bits}_g${k.group}_${k.dtype}_${k.pool}${k.scales === 'fp16' ? '_s16' : ''}`;
}

/** JSON with object keys sorted, so equal specs hash equally whatever order their fields were built in. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_k, v) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, v[k]]))
      : v,
  );
}

/** The spec's location (`file`) is left out: the same spec compiled from another path is the same build. */
export function specHash(spec: ResolvedSpec): string {
  const { file: _file, ...content } = spec;
  return createHash('sha256').update(canonicalJson(content)).update('\0' + compilerVersion).digest('hex');
}

// 2 AVX2 cores with 512 KB L2 each: a KC×NC packed weight panel of 512×256 fp32 streams through L2 while a
// 16-column slice of it (32 KB) is reused from L1 by every MR rows of an MC×KC block of x (144 KB). KC = 512
// rather than 256 makes a LLaMA-small projection (in 512) one panel deep, so C is written once instead of
// read and written again: measured 10–13% faster on 1024×512→1376 and the 32000-row classifier (min of 25,
// this machine), even on 512→512. KC is a whole number of groups so α, β and the pooled sums of a group
// never straddle two panels.
function cpuConfig(k: SpecializationKey): CpuConfig {
  const targetKc = 512;
  const kc = k.group <= targetKc ? Math.floor(targetKc / k.group) * k.group : k.group;
  // Up to 16 rows (a server's decode batch) take the GEMV: it reads each weight once for all of them, where the
  // GEMM would dequantize a panel that few rows cannot amortize.
  return { mc: 72, nc: 256, kc, gemvMaxRows: 16, fastPath: k.group % 32 === 0 };
}

/** Dynamic shared memory the tiled GEMM is launched with in one orientation (y: W rows are output features; dx:
 * transposed), mirroring kern::Tile in templates/cuda/gemm.cuh (test/inspect.test.ts checks the two agree): staged
 * x tiles, one dequantized W tile and staged packed q — or, in the epilogue, the fp32 output tile plus the
 * adapter's h and B chunks (16 ranks at a time; forward only), whichever is larger. Each row gets a 16-byte pad. */
export function gemmSmemBytes(bits: number, dtype: ActDType, t: { bm: number; bn: number; bk: number; stages: number }, trans: boolean): number {
  const actBytes = dtype === 'fp32' ? 4 : 2;
  const pad = 16 / actBytes;
  const [wRows, wCols] = trans ? [t.bk, t.bn] : [t.bn, t.bk];
  const x = t.stages * t.bm * (t.bk + pad) * actBytes;
  const wDequant = wRows * (wCols + pad) * actBytes;
  const wPacked = Math.ceil((t.stages * wRows * (wCols / 32) * bits * 4) / 16) * 16;
  const adapter = trans ? 0 : (t.bm + t.bn) * (16 + 1) * 4;
  return Math.max(x + wDequant + wPacked, t.bm * (t.bn + 4) * 4 + adapter);
}

// Tensor-core tiles (mma.sync m16n8k16) for M ≥ 16, a GEMV path below. BK is one 32-input packed block, or
// two for 16-bit activations when a group spans them (α, β then load once per stage); fp32 stays at 32 so
// every tile fits the 99 KB of dynamic shared memory the smallest sm_8x/sm_9x parts allow.
function cudaConfig(k: SpecializationKey, archs: string[]): CudaConfig {
  const actBytes = k.dtype === 'fp32' ? 4 : 2;
  const tile = { bm: 64, bn: 128, bk: actBytes === 2 && k.group % 64 === 0 ? 64 : 32, stages: 3 };
  const warps = 4;
  const threads = warps * 32;
  return {
    archs: [...archs],
    gemv: { threads: 128, rowsPerBlock: 4, maxRows: 15 },
    gemm: { ...tile, warps, smemBytes: Math.max(gemmSmemBytes(k.bits, k.dtype, tile, false), gemmSmemBytes(k.bits, k.dtype, tile, true)) },
    // Aim for 4 resident blocks per SM: 65536 registers / (4 · threads).
    maxRegisters: Math.min(255, Math.floor(65536 / (4 * threads))),
  };
}

export function planSpec(spec: ResolvedSpec): KernelPlan {
  const byId = new Map<string, Specialization>();
  const layers: PlannedLayer[] = [];
  for (const layer of spec.layers) {
    const key: SpecializationKey = { bits: layer.bits, group: layer.group, dtype: layer.dtype, pool: layer.pool, scales: layer.scales ?? 'fp32' };
    const id = specializationId(key);
    let s = byId.get(id);
    if (!s) {
      s = {
        ...key,
        id,
        layout: 'blocked32',
        cpu: spec.targets.cpu ? cpuConfig(key) : null,
        cuda: spec.targets.cuda ? cudaConfig(key, spec.targets.cuda.archs) : null,
        layers: [],
      };
      byId.set(id, s);
    }
    s.layers.push(layer.name);
    layers.push({
      name: layer.name,
      specialization: id,
      inFeatures: layer.inFeatures,
      outFeatures: layer.outFeatures,
      rank: layer.rank,
      alpha: layer.alpha,
      dropout: layer.dropout,
      scale: layer.rank > 0 ? layer.alpha / layer.rank : 0,
      poolScale: poolScale(layer.pool, layer.group, layer.inFeatures),
      count: layer.count,
    });
  }
  return {
    spec,
    specHash: specHash(spec),
    compilerVersion,
    specializations: [...byId.values()],
    layers,
  };
}
