// generated/<spec>/manifest.json: what was compiled from what — the spec hash, the compiler version, every
// kernel with its specialization constants and per-target configs, and which layer uses which kernel.
import type { KernelPlan } from './ir.ts';
import type { OpDescriptor } from './ops.ts';

export const KERNEL_OPS = ['quantize', 'dequantize', 'forward', 'backward', 'merge'] as const;

export interface Manifest {
  spec: string;
  specHash: string;
  compilerVersion: string;
  targets: KernelPlan['spec']['targets'];
  /** Backends whose sources were rendered (cuda still needs nvcc at build time; `addon.backends()` is final). */
  backends: string[];
  kernels: Array<{
    id: string;
    bits: number;
    group: number;
    dtype: string;
    pool: string;
    layout: string;
    fastPath: boolean;
    ops: string[];
    cpu: KernelPlan['specializations'][number]['cpu'];
    cuda: KernelPlan['specializations'][number]['cuda'];
    layers: string[];
  }>;
  layers: Record<string, { specialization: string; inFeatures: number; outFeatures: number; rank: number; scale: number; poolScale: number; count: number }>;
  coreOps: string[];
  /** Rendered files (relative to the folder), for `inspect` and for humans. */
  files: string[];
}

export function buildManifest(plan: KernelPlan, backends: string[], ops: OpDescriptor[], files: string[]): Manifest {
  return {
    spec: plan.spec.name,
    specHash: plan.specHash,
    compilerVersion: plan.compilerVersion,
    targets: plan.spec.targets,
    backends,
    kernels: plan.specializations.map((s) => ({
      id: s.id,
      bits: s.bits,
      group: s.group,
      dtype: s.dtype,
      pool: s.pool,
      layout: s.layout,
      fastPath: s.group % 32 === 0,
      ops: [...KERNEL_OPS],
      cpu: s.cpu,
      cuda: s.cuda,
      layers: s.layers,
    })),
    layers: Object.fromEntries(
      plan.layers.map((l) => [
        l.name,
        { specialization: l.specialization, inFeatures: l.inFeatures, outFeatures: l.outFeatures, rank: l.rank, scale: l.scale, poolScale: l.poolScale, count: l.count },
      ]),
    ),
    coreOps: ops.map((o) => o.name),
    files: [...files].sort(),
  };
}
