// The property grid every kernel backend (cpu, cuda, emu) is checked on against runtime/reference/: bits
// {2,3,4,8} × groups {32, 64, 128, 43} for fp32, a diagonal of it for fp16 and bf16, plus the sum and peft
// pooling conventions, fp16 scales (`scales fp16`) for every bits value over several groups; odd output sizes; ranks {1, 8, 64} and rows M {1, 3, 64, 257} as runtime values.
// Built in code as a ResolvedSpec of standalone layers (one per specialization), so it does not depend on
// the DSL. Below the grid: random layer data for a case, as arguments of both the native kernels and the
// float64 reference, and tolerances derived from how a result was accumulated and stored.
import type { ActDType, Bits, Pool, ResolvedLayer, ResolvedSpec, ScaleDType, Targets } from '../dsl/resolved.ts';
import { scaleValues } from '../runtime/model/scales.ts';
import { poolScale } from '../dsl/resolved.ts';
import type { HostArgs, LayerCallArgs } from '../runtime/native.ts';

/** fp32 activations are Float32Array; fp16/bf16 are Uint16Array of raw bits. */
export type Activation = Float32Array | Uint16Array;
import { decodeAct, encodeAct } from '../runtime/reference/numeric.ts';
import { quantize, type RefLayerArgs } from '../runtime/reference/qalora.ts';
import { uniformStream } from '../runtime/random.ts';

export interface GridKey {
  bits: Bits;
  group: number;
  dtype: ActDType;
  pool: Pool;
  scales: ScaleDType;
}

/** One kernel call to check: a layer of the grid spec with runtime sizes. */
export interface GridCase extends GridKey {
  /** Specialization id, b{bits}_g{group}_{dtype}_{pool}[_s16]. */
  id: string;
  /** The spec layer using this specialization. */
  layer: string;
  in: number;
  out: number;
  rank: number;
  m: number;
  alpha: number;
  dropout: number;
}

export interface KernelGrid {
  spec: ResolvedSpec;
  keys: GridKey[];
  cases: GridCase[];
}

export const GRID_BITS: readonly Bits[] = [2, 3, 4, 8];
export const GRID_GROUPS: readonly number[] = [32, 64, 128, 43];
export const GRID_RANKS: readonly number[] = [1, 8, 64];
export const GRID_ROWS: readonly number[] = [1, 3, 64, 257];
const OUTS = [37, 50];

/** in = 384 for the power-of-two groups, 172 (= 4·43, stories260K's hidden size) for the odd one. */
export function gridIn(group: number): number {
  return group === 43 ? 172 : 384;
}

function gridKeys(): GridKey[] {
  const keys: GridKey[] = [];
  const s32 = 'fp32' as const;
  for (const bits of GRID_BITS) for (const group of GRID_GROUPS) keys.push({ bits, group, dtype: 'fp32', pool: 'mean', scales: s32 });
  // A diagonal per half-precision dtype: every bits value and every group appears once in each.
  GRID_BITS.forEach((bits, i) => {
    keys.push({ bits, group: GRID_GROUPS[i], dtype: 'fp16', pool: 'mean', scales: s32 });
    keys.push({ bits, group: GRID_GROUPS[(i + 1) % 4], dtype: 'bf16', pool: 'mean', scales: s32 });
  });
  keys.push({ bits: 4, group: 32, dtype: 'fp32', pool: 'sum', scales: s32 });
  keys.push({ bits: 3, group: 43, dtype: 'fp16', pool: 'sum', scales: s32 });
  keys.push({ bits: 4, group: 64, dtype: 'fp32', pool: 'peft', scales: s32 });
  keys.push({ bits: 2, group: 43, dtype: 'bf16', pool: 'peft', scales: s32 });
  // fp16 scales: every bits value, each with another group (the odd 43 included), and one fp16-activation case.
  GRID_BITS.forEach((bits, i) => keys.push({ bits, group: GRID_GROUPS[(i + 2) % 4], dtype: 'fp32', pool: 'mean', scales: 'fp16' }));
  keys.push({ bits: 4, group: 32, dtype: 'fp16', pool: 'mean', scales: 'fp16' });
  return keys;
}

/** How the CPU and emulator suites load the default grid: the emulator needs no nvcc, so none runs. */
export const GRID_LOAD = { jobs: 2, noCuda: true } as const;

export const gridId = (k: GridKey): string => `b${k.bits}_g${k.group}_${k.dtype}_${k.pool}${k.scales === 'fp16' ? '_s16' : ''}`;

/**
 * The grid spec and its cases. Each specialization gets two cases; (M, rank) pairs rotate over the grid so that
 * every bits value meets every M and every rank, and each dtype meets M = 1 and M > 64.
 * `targets` defaults to the CPU and the emulator's sm_80, one addon the CPU and emulator suites share (loaded with
 * GRID_LOAD); the nvcc suite passes its own (the spec name follows, so the generated folders never collide).
 */
export function kernelGrid(opts: { targets?: Targets; name?: string } = {}): KernelGrid {
  const targets: Targets = opts.targets ?? { cpu: true, cuda: { archs: ['sm_80'] } };
  const name = opts.name ?? (opts.targets ? 'kernel-grid-cuda' : 'kernel-grid');
  const keys = gridKeys();
  const layers: ResolvedLayer[] = keys.map((k, i) => ({
    ...k,
    name: `l_${gridId(k)}`,
    inFeatures: gridIn(k.group),
    outFeatures: OUTS[i % OUTS.length],
    rank: 8,
    alpha: 16,
    dropout: 0.1,
    count: 1,
  }));
  const cases: GridCase[] = [];
  keys.forEach((k, i) => {
    for (let c = 0; c < 2; c++) {
      const t = 2 * i + c;
      cases.push({
        ...k,
        id: gridId(k),
        layer: layers[i].name,
        in: layers[i].inFeatures,
        out: layers[i].outFeatures,
        m: GRID_ROWS[(i + 2 * c + (i >> 2)) % GRID_ROWS.length],
        rank: GRID_RANKS[t % GRID_RANKS.length],
        alpha: 16,
        dropout: 0.1,
      });
    }
  });
  return { spec: { name, file: `<${name}>`, layers, targets }, keys, cases };
}

// ---- Data and tolerances ------------------------------------------------------------------------------------

/** Deterministic uniform [-1, 1) stream. */
export function randoms(seed: number): () => number {
  const u = uniformStream(seed);
  return () => u() * 2 - 1;
}

export function randomF32(n: number, rnd: () => number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rnd() * scale;
  return a;
}

/** An activation tensor in the case's dtype, and the exact values it holds. */
export interface ActData {
  stored: Activation;
  values: Float64Array;
}
export function randomAct(c: GridCase, n: number, rnd: () => number): ActData {
  const stored = encodeAct(randomF32(n, rnd), c.dtype);
  return { stored, values: decodeAct(stored, c.dtype) };
}

export function emptyAct(c: GridCase, n: number): Activation {
  return c.dtype === 'fp32' ? new Float32Array(n) : new Uint16Array(n);
}

export interface LayerData {
  native: HostArgs<LayerCallArgs>;
  ref: RefLayerArgs;
  w: Float32Array;
}

/**
 * A quantized layer (quantized by the reference) with a random adapter, as native and reference arguments; the
 * native α/β are in the case's scale storage, the reference's are their values.
 */
export function layerData(c: GridCase, seed: number, opts: { training?: boolean; rank?: number } = {}): LayerData {
  const rnd = randoms(seed);
  const rank = opts.rank ?? c.rank;
  const L = c.in / c.group;
  const w = randomF32(c.out * c.in, rnd, 0.5);
  const { qweight, alpha, beta } = quantize(w, c.out, c.in, c.bits, c.group, c.scales);
  const loraA = randomF32(rank * L, rnd, 0.5);
  const loraB = randomF32(c.out * rank, rnd, 0.5);
  const native: HostArgs<LayerCallArgs> = {
    qweight, alpha, beta, loraA, loraB,
    m: c.m, in: c.in, out: c.out, rank,
    scale: rank > 0 ? c.alpha / rank : 0,
    poolScale: poolScale(c.pool, c.group, c.in),
    dropout: c.dropout,
    training: opts.training ?? false,
    seed: 0x5eed + seed,
  };
  return { native, ref: { ...native, alpha: scaleValues(alpha), beta: scaleValues(beta), bits: c.bits, group: c.group, pool: c.pool }, w };
}

/** The same layer with every weight replaced by its absolute value: the reference on it bounds |terms|. */
export function absLayer(ref: RefLayerArgs): RefLayerArgs {
  const abs = (a?: ArrayLike<number>) => (a ? Float64Array.from(a, Math.abs) : undefined);
  return { ...ref, alpha: abs(ref.alpha)!, beta: abs(ref.beta)!, loraA: abs(ref.loraA), loraB: abs(ref.loraB), scale: Math.abs(ref.scale) };
}

/** Relative rounding of one store in the dtype (half an ulp). */
export function storeEps(dtype: GridCase['dtype']): number {
  return dtype === 'fp32' ? 2 ** -24 : dtype === 'fp16' ? 2 ** -11 : 2 ** -8;
}

/**
 * Largest violation of |got − want| ≤ accEps·bound + store·|want| + tiny, as a message, or '' when none.
 * `bound` is the same computation on absolute values (Σ|terms|), which fp32 accumulation error scales with;
 * over the grid's few hundred terms the CPU kernels stay within one fp32 ulp of it (5.5e-8), so the default
 * 1e-6 leaves a margin of ~16 ulps. Backends that round Ŵ or x to 16 bits before multiplying pass their own.
 */
export function compare(name: string, got: ArrayLike<number>, want: ArrayLike<number>, bound: ArrayLike<number>, store: number, accEps = 1e-6): string {
  if (got.length !== want.length) return `${name}: length ${got.length}, want ${want.length}`;
  let worst = 0;
  let at = -1;
  for (let i = 0; i < want.length; i++) {
    const tol = accEps * bound[i] + store * Math.abs(want[i]) + 1e-30;
    const excess = Math.abs(got[i] - want[i]) / tol;
    if (!(excess <= worst)) {
      worst = excess;
      at = i;
    }
  }
  return worst > 1 || Number.isNaN(worst)
    ? `${name}[${at}] = ${got[at]}, want ${want[at]} (error ${Math.abs(got[at] - want[at]).toExponential(2)}, ${worst.toFixed(1)}× the tolerance)`
    : '';
}
