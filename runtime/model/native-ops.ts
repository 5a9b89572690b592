// The native functions the model calls: the core ops and the spec's QA-LoRA kernels on the chosen backend, and
// on a GPU backend the memory the model's tensors live in. Their types are runtime/native-api.ts, emitted from
// the descriptors the addon is rendered from; runtime/native.ts builds and loads the addon.
import type { ActDType, Pool, ResolvedSpec, ScaleDType } from '../../dsl/resolved.ts';
import { DEFAULT_CUDA_ARCHS } from '../../dsl/defaults.ts';
import { specializationId as planSpecializationId } from '../../compiler/plan.ts';
import type { BackendName } from './types.ts';
import { QaloraError } from '../errors.ts';
import type { Addon, CoreOps, DeviceApi, KernelSet, LayerCallArgs } from '../native-api.ts';

export type { CoreOps } from '../native-api.ts';
/** One specialization's entry points on one backend. */
export type SpecKernels = KernelSet;
/** The JS form of LayerArgs (templates/common/qalora_common.h). */
export type KernelLayerArgs = LayerCallArgs;

export interface NativeOps {
  core: CoreOps;
  /** The chosen backend's kernels by specialization id (empty for a float model). */
  kernels: Record<string, SpecKernels>;
  backend: BackendName;
  /** The backend's memory, on cuda and emu: the model keeps its tensors there. */
  device?: DeviceApi;
  /** The addon all of this comes from (its emulator counters, its build). */
  addon: Addon;
}

/** 'b4_g32_fp16_mean' — the plan's id of a (bits, group, dtype, pool, scales) specialization (compiler/plan.ts). */
export function specializationId(s: { bits: number; group: number; dtype: ActDType; pool: Pool; scales?: ScaleDType }): string {
  return planSpecializationId({ ...s, bits: s.bits as 2 | 3 | 4 | 8, scales: s.scales ?? 'fp32' });
}

/**
 * Loads (building if needed) the addon with the specializations of a spec's layers for the backend, or without any
 * for a float model: a CPU run builds no CUDA (minutes on a small machine), a GPU run adds the spec's archs.
 */
export async function loadNativeOps(spec: ResolvedSpec | undefined, backend: BackendName): Promise<NativeOps> {
  const native = await import('../native.ts');
  const gpu = backend !== 'cpu';
  const targets = { cpu: true, cuda: gpu ? { archs: spec?.targets.cuda?.archs ?? [...DEFAULT_CUDA_ARCHS] } : null };
  // The emulator needs no nvcc: an emu run does not wait for the real CUDA build (a cuda run builds it).
  const addon: Addon = await native.loadSpecializations((spec?.layers ?? []).map(native.keyOf), targets, { noCuda: backend === 'emu' });
  if (!spec && !gpu) return { core: addon.core, kernels: {}, backend, addon };
  const available = addon.backends();
  const table = addon.kernels[backend];
  if (!table || !available.includes(backend)) {
    const why = backend === 'cuda' ? ` (${addon.cudaStatus()})` : '';
    throw new QaloraError(`backend '${backend}' is not available for ${spec ? `spec '${spec.name}'` : 'the float model'}${why}; built backends: ${available.join(', ') || 'none'}`);
  }
  if (backend === 'cuda' && !addon.cudaStatus().startsWith('ok')) {
    throw new QaloraError(`backend 'cuda' is not usable: ${addon.cudaStatus()}`);
  }
  return { core: coreFor(addon, backend), kernels: table, backend, device: gpu ? addon.device[backend] : undefined, addon };
}

/** The one switch: a GPU backend's core ops where it has them, the CPU's for the rest. */
export function coreFor(addon: Pick<Addon, 'core' | 'coreOn'>, backend: BackendName): CoreOps {
  const own = backend === 'cpu' ? undefined : addon.coreOn[backend];
  return own ? { ...addon.core, ...own } : addon.core;
}
