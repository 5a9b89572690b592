// The one door from TypeScript to native code: plan → render → build (cached by content hash, locked against
// parallel builders) → load. The addon is typed by runtime/native-api.ts, which the compiler emits from the same
// descriptors as the addon's wrappers; a spec-specific caller may import generated/<spec>/bindings.ts instead for
// exact specialization ids.
import { constants } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import type { ResolvedLayer, ResolvedSpec } from '../dsl/resolved.ts';
import { DEFAULT_CUDA_ARCHS } from '../dsl/defaults.ts';
import type { BuildOptions } from '../compiler/build.ts';
import { compileAndBuild, defaultOutDir, generatedRoot } from '../compiler/index.ts';
import type { KernelPlan, SpecializationKey } from '../compiler/ir.ts';
import { canonicalJson, compilerVersion, specializationId } from '../compiler/plan.ts';
import type { Manifest } from '../compiler/manifest.ts';
import type { RenderOptions } from '../compiler/render.ts';
import type { BackendName } from './model/types.ts';
import type { Addon, KernelSet } from './native-api.ts';

export type { Addon, CoreOps, DeviceApi, DeviceTensor, DType, EmuCounters, HostArgs, KernelSet, LayerCallArgs, PoolStats, Tensor } from './native-api.ts';

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

/** What an addon is built for: the CPU, and CUDA (with the emulator) for these archs or not at all. */
export type KernelTargets = ResolvedSpec['targets'];

/**
 * The hash a build of these specializations on these targets is cached under, as Triton keys its cache: the
 * kernels depend on nothing else — not on a spec's name, its layers' shapes or the file it came from.
 */
export function kernelsKey(keys: SpecializationKey[], targets: KernelTargets): string {
  const ids = [...new Set(keys.map(specializationId))].sort();
  return createHash('sha256').update(canonicalJson({ ids, targets, compilerVersion })).digest('hex').slice(0, 16);
}

/** Where loadSpecializations builds: generated/cache/<kernelsKey>/. */
export function kernelsDir(keys: SpecializationKey[], targets: KernelTargets): string {
  return join(generatedRoot, 'cache', kernelsKey(keys, targets));
}

/**
 * The addon holding these specializations (each once; layer i of its plan is named by its specialization id) on
 * these targets, built on first use and shared by every caller that needs the same kernels.
 */
export async function loadSpecializations(keys: SpecializationKey[], targets: KernelTargets, opts: Omit<LoadOptions, 'outDir'> = {}): Promise<NativeKernels> {
  const unique = [...new Map(keys.map((k) => [specializationId(k), k] as const)).entries()].sort(([a], [b]) => (a < b ? -1 : 1));
  const spec: ResolvedSpec = {
    name: `kernels_${kernelsKey(keys, targets)}`,
    file: '<kernels>',
    layers: unique.map(([id, k]) => ({ name: id, bits: k.bits, group: k.group, dtype: k.dtype, pool: k.pool, scales: k.scales, inFeatures: k.group, outFeatures: 1, rank: 1, alpha: 1, dropout: 0, count: 1 })),
    targets,
  };
  return loadKernels(spec, { ...opts, outDir: kernelsDir(keys, targets) });
}

/** The specialization a spec's layer runs. */
export function keyOf(l: ResolvedLayer): SpecializationKey {
  return { bits: l.bits, group: l.group, dtype: l.dtype, pool: l.pool, scales: l.scales ?? 'fp32' };
}

/**
 * The addon without QA-LoRA kernels: core ops (matmul, norms, attention, …) for float models. With `gpu`, also
 * the cuda and emu backends' core ops and device memory (a float model run on a GPU backend).
 */
export async function loadCore(opts: Omit<LoadOptions, 'outDir'> & { gpu?: boolean } = {}): Promise<NativeKernels> {
  return loadSpecializations([], { cpu: true, cuda: opts.gpu ? { archs: [...DEFAULT_CUDA_ARCHS] } : null }, opts);
}
