// The one door from TypeScript to native code: plan → render → build (cached by content hash, locked against
// parallel builders) → load. Callers get the addon typed by the same interfaces the compiler emits into
// generated/<spec>/bindings.ts; a spec-specific caller may import that file for exact specialization ids.
import { constants } from 'node:os';
import { join } from 'node:path';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import type { BuildOptions } from '../compiler/build.ts';
import type { EmuCounters } from '../compiler/emu-counters.ts';
import { compileAndBuild, defaultOutDir, generatedRoot } from '../compiler/index.ts';
import type { KernelPlan } from '../compiler/ir.ts';
import type { Manifest } from '../compiler/manifest.ts';
import type { RenderOptions } from '../compiler/render.ts';
import type { BackendName, ScaleArray } from './model/types.ts';

/**
 * One layer call; the addon checks every array against these sizes. loraA/loraB are needed when rank > 0.
 * alpha and beta are in the specialization's scale storage (KernelSet.scales): the addon refuses the other one.
 */
export interface LayerCallArgs<S extends ScaleArray = ScaleArray> {
  qweight: Uint32Array;
  alpha: S;
  beta: S;
  loraA?: Float32Array;
  loraB?: Float32Array;
  m: number;
  in: number;
  out: number;
  rank: number;
  scale: number;
  poolScale: number;
  dropout: number;
  training: boolean;
  seed: number | bigint;
  /**
   * CPU kernels only: the GEMV (m ≤ the spec's GEMV rows, group a multiple of 32) quantizes x to int8 per 32
   * inputs and uses integer dot products (`--activations int8`); otherwise ignored. Default false: fp32, exact.
   */
  int8Activations?: boolean;
}

/** fp32 activations are Float32Array; fp16/bf16 are Uint16Array of raw bits. */
export type Activation = Float32Array | Uint16Array;

export interface KernelSet<A extends Activation = Activation, S extends ScaleArray = ScaleArray> {
  readonly bits: number;
  readonly group: number;
  /** Storage of α and β: 'fp32' takes Float32Array, 'fp16' Uint16Array of fp16 bits. */
  readonly scales: 'fp32' | 'fp16';
  quantize(w: Float32Array, out: number, inFeatures: number, qweight: Uint32Array, alpha: S, beta: S): void;
  dequantize(qweight: Uint32Array, alpha: S, beta: S, out: number, inFeatures: number, w: Float32Array): void;
  forward(args: LayerCallArgs<S>, x: A, y: A): void;
  backward(args: LayerCallArgs<S>, x: A, dy: A, dx: A, gradA: Float32Array, gradB: Float32Array): void;
  merge(args: LayerCallArgs<S>, betaOut: S): void;
}

/** Core ops as declared in templates/{core,cpu}/*.ops.json; exact signatures are in generated/<spec>/bindings.ts. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type CoreOps = Record<string, (...args: any[]) => any>;

export interface Addon {
  kernels: Partial<Record<BackendName, Record<string, KernelSet>>>;
  core: CoreOps;
  /** The core ops a GPU backend also implements ("cuda": true descriptors), present only for compiled backends. */
  coreOn?: Partial<Record<BackendName, CoreOps>>;
  backends(): BackendName[];
  /** "ok: <device>, sm_XY" or "unavailable: <reason>"; never throws. */
  cudaStatus(): string;
  /** The emulator's transfer, allocation, synchronization and launch counters; present when emu is compiled. */
  emuCounters?: () => EmuCounters;
  emuResetCounters?: () => void;
  specName: string;
  specHash: string;
  compilerVersion: string;
}

export interface NativeKernels extends Addon {
  plan: KernelPlan;
  manifest: Manifest;
  dir: string;
  addonPath: string;
  /** Whether this call found the addon already built. */
  cached: boolean;
  /** The kernels of layer `name` on `backend`; throws naming what is missing. */
  layer(name: string, backend: BackendName): KernelSet;
}

export interface LoadOptions extends RenderOptions, BuildOptions {
  /** Where to generate; default generated/<spec name>. */
  outDir?: string;
}

const loaded = new Map<string, Addon>();

/** dlopen with RTLD_NOW: a kernel a template forgot to define fails here, by name, not at its first call. */
export function loadAddonFile(path: string, hash: string): Addon {
  const key = `${path}#${hash}`;
  let addon = loaded.get(key);
  if (!addon) {
    const module = { exports: {} as Addon };
    process.dlopen(module, path, constants.dlopen.RTLD_NOW);
    addon = module.exports;
    loaded.set(key, addon);
  }
  return addon;
}

export async function loadKernels(spec: ResolvedSpec, opts: LoadOptions = {}): Promise<NativeKernels> {
  const { compiled, built } = await compileAndBuild(spec, opts.outDir ?? defaultOutDir(spec), { ...opts, bindings: false });
  const addon = loadAddonFile(built.addonPath, built.hash);
  const plan = compiled.plan;
  return {
    ...addon,
    kernels: addon.kernels,
    core: addon.core,
    coreOn: addon.coreOn,
    backends: () => addon.backends(),
    cudaStatus: () => addon.cudaStatus(),
    plan,
    manifest: compiled.manifest,
    dir: compiled.dir,
    addonPath: built.addonPath,
    cached: built.cached,
    layer(name: string, backend: BackendName): KernelSet {
      const planned = plan.layers.find((l) => l.name === name);
      if (!planned) throw new Error(`spec '${spec.name}' has no layer '${name}' (layers: ${plan.layers.map((l) => l.name).join(', ')})`);
      const set = addon.kernels[backend]?.[planned.specialization];
      if (!set)
        throw new Error(`backend '${backend}' has no kernels for ${planned.specialization} in spec '${spec.name}' (built backends: ${addon.backends().join(', ') || 'none'}; ${addon.cudaStatus()})`);
      return set;
    },
  };
}

/** The spec-less addon: core ops (matmul, norms, attention, …) for float models, no QA-LoRA kernels. */
export async function loadCore(opts: Omit<LoadOptions, 'outDir'> = {}): Promise<Addon> {
  const spec: ResolvedSpec = { name: '_core', file: '<core>', layers: [], targets: { cpu: true, cuda: null } };
  return loadKernels(spec, { ...opts, outDir: join(generatedRoot, '_core') });
}
