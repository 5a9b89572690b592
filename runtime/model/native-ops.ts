// The native functions the model calls, typed by what runtime/model needs from them: the core ops declared in
// templates/core/core.ops.json and the spec's QA-LoRA kernels (docs/ARCHITECTURE.md). runtime/native.ts builds
// and loads the addon; this file only picks the parts the model uses.
import type { ActDType, Pool, ResolvedSpec, ScaleDType } from '../../dsl/resolved.ts';
import { specializationId as planSpecializationId } from '../../compiler/plan.ts';
import type { BackendName, ScaleArray } from './types.ts';
import { QaloraError } from '../errors.ts';
import type { LayerCallArgs } from '../native.ts';

export interface CoreOps {
  gemm(a: Float32Array, b: Float32Array, c: Float32Array, m: number, n: number, k: number, transA: boolean, transB: boolean, accumulate: boolean): void;
  embedding_forward(table: Float32Array, ids: Int32Array, out: Float32Array, n: number, vocab: number, dim: number): void;
  embedding_backward(ids: Int32Array, dout: Float32Array, dtable: Float32Array, n: number, vocab: number, dim: number): void;
  rmsnorm_forward(x: Float32Array, w: Float32Array, y: Float32Array, rstd: Float32Array, rows: number, dim: number, eps: number): void;
  rmsnorm_backward(x: Float32Array, w: Float32Array, rstd: Float32Array, dy: Float32Array, dx: Float32Array, rows: number, dim: number): void;
  rope_forward(x: Float32Array, pos: Int32Array, rows: number, heads: number, headDim: number, theta: number, rotateHalf: boolean): void;
  rope_backward(dx: Float32Array, pos: Int32Array, rows: number, heads: number, headDim: number, theta: number, rotateHalf: boolean): void;
  attention_forward(q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array, batch: number, tq: number, tk: number, heads: number, kvHeads: number, headDim: number): void;
  attention_backward(q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array, dout: Float32Array, dq: Float32Array, dk: Float32Array, dv: Float32Array, batch: number, tq: number, tk: number, heads: number, kvHeads: number, headDim: number): void;
  swiglu_forward(gate: Float32Array, up: Float32Array, out: Float32Array, n: number): void;
  swiglu_backward(gate: Float32Array, up: Float32Array, dout: Float32Array, dgate: Float32Array, dup: Float32Array, n: number): void;
  cross_entropy_forward(logits: Float32Array, targets: Int32Array, n: number, vocab: number): number;
  cross_entropy_backward(logits: Float32Array, targets: Int32Array, n: number, vocab: number, scale: number, dlogits: Float32Array): number;
  add_inplace(y: Float32Array, x: Float32Array, n: number): void;
  f32_to_f16(x: Float32Array, y: Uint16Array, n: number): void;
  f16_to_f32(x: Uint16Array, y: Float32Array, n: number): void;
  f32_to_bf16(x: Float32Array, y: Uint16Array, n: number): void;
  bf16_to_f32(x: Uint16Array, y: Float32Array, n: number): void;
}

/** The JS form of LayerArgs (templates/common/qalora_common.h). */
export type KernelLayerArgs = LayerCallArgs;

export type Activations = Float32Array | Uint16Array;

/** One specialization's entry points on one backend. */
export interface SpecKernels {
  /** α, β (and merge's betaOut) in the specialization's scale storage: Float32Array or fp16 bits. */
  quantize(w: Float32Array, out: number, inF: number, qweight: Uint32Array, alpha: ScaleArray, beta: ScaleArray): void;
  dequantize(qweight: Uint32Array, alpha: ScaleArray, beta: ScaleArray, out: number, inF: number, w: Float32Array): void;
  forward(args: KernelLayerArgs, x: Activations, y: Activations): void;
  backward(args: KernelLayerArgs, x: Activations, dy: Activations, dx: Activations, gradA: Float32Array, gradB: Float32Array): void;
  merge(args: KernelLayerArgs, betaOut: ScaleArray): void;
}

export interface NativeOps {
  core: CoreOps;
  /** The chosen backend's kernels by specialization id (empty for a float model). */
  kernels: Record<string, SpecKernels>;
  backend: BackendName;
}

/** 'b4_g32_fp16_mean' — the plan's id of a (bits, group, dtype, pool, scales) specialization (compiler/plan.ts). */
export function specializationId(s: { bits: number; group: number; dtype: ActDType; pool: Pool; scales?: ScaleDType }): string {
  return planSpecializationId({ ...s, bits: s.bits as 2 | 3 | 4 | 8, scales: s.scales ?? 'fp32' });
}

interface LoadedAddon {
  core: CoreOps;
  coreOn?: Partial<Record<BackendName, Partial<CoreOps>>>;
  kernels?: Record<string, Record<string, SpecKernels>>;
  backends?: () => string[];
  cudaStatus?: () => string;
}

/** Loads (building if needed) the addon for a spec, or the spec-less core addon for a float model. */
export async function loadNativeOps(spec: ResolvedSpec | undefined, backend: BackendName): Promise<NativeOps> {
  const native = await import('../native.ts');
  const addon = (spec ? await native.loadKernels(specForBackend(spec, backend)) : await native.loadCore()) as unknown as LoadedAddon;
  if (!spec) return { core: addon.core, kernels: {}, backend };
  const available = addon.backends?.() ?? Object.keys(addon.kernels ?? {});
  const table = addon.kernels?.[backend];
  if (!table || !available.includes(backend)) {
    const why = backend === 'cuda' && addon.cudaStatus ? ` (${addon.cudaStatus()})` : '';
    throw new QaloraError(`backend '${backend}' is not available for spec '${spec.name}'${why}; built backends: ${available.join(', ') || 'none'}`);
  }
  if (backend === 'cuda' && addon.cudaStatus && !addon.cudaStatus().startsWith('ok')) {
    throw new QaloraError(`backend 'cuda' is not usable: ${addon.cudaStatus()}`);
  }
  return { core: coreFor(addon, backend), kernels: table, backend };
}

/** The one switch: a GPU backend's core ops where it has them, the CPU's for the rest. */
export function coreFor(addon: Pick<LoadedAddon, 'core' | 'coreOn'>, backend: BackendName): CoreOps {
  const own = backend === 'cpu' ? undefined : addon.coreOn?.[backend];
  return own ? { ...addon.core, ...own } : addon.core;
}

/**
 * The spec reduced to what the backend needs (LlamaModel.create applies it): a CPU run does not build the CUDA
 * and emulated backends (minutes on a small machine). It gets its own name, so its build is cached beside the
 * full one, not over it.
 */
export function specForBackend(spec: ResolvedSpec, backend: BackendName): ResolvedSpec {
  if (backend !== 'cpu' || !spec.targets.cuda) return spec;
  return { ...spec, name: `${spec.name}_cpu`, targets: { cpu: true, cuda: null } };
}
