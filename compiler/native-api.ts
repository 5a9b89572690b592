// Stage 3b: the TypeScript declaration of the native API, emitted from the op descriptors
// (templates/{core,cpu}/*.ops.json), the emulator's counter list and the fixed kernel ABI below — the same
// inputs the addon's C++ wrappers are rendered from. The runtime imports its types from the emitted
// runtime/native-api.ts, which is not in git: `npm ci`/`npm install` write it (the `prepare` script), as do
// `npm run gen:api` and `npm run typecheck`, and test/native-api.test.ts fails while it is stale. Each spec's
// generated bindings.ts starts with the same text and narrows it to the spec's specializations.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EMU_COUNTERS } from './emu-counters.ts';
import { loadOpDescriptors, tsType, type OpDescriptor } from './ops.ts';

const repoRoot = join(fileURLToPath(import.meta.url), '..', '..');
export const NATIVE_API_PATH = join(repoRoot, 'runtime', 'native-api.ts');

const doc = (text: string, indent = '') => `${indent}/** ${text} */\n`;

/**
 * The declarations. `addonAlias`: also declare `Addon` as the addon with any specializations (the runtime's
 * view); a spec's bindings declare their own, narrowed to the spec.
 */
export function emitNativeApi(ops: OpDescriptor[], opts: { addonAlias: boolean }): string {
  const coreOps = ops
    .map((op) => {
      const params = op.args.map((a) => `${a.name}: ${tsType(a)}`).join(', ');
      return doc(`${op.doc ? op.doc + ' ' : ''}(${op.cpp}, ${op.source})`, '  ') + `  ${op.name}(${params}): ${op.returns === 'f64' ? 'number' : 'void'};\n`;
    })
    .join('');
  const gpu = ops.filter((op) => op.cuda).map((op) => `'${op.name}'`);
  const counters = EMU_COUNTERS.map((c) => doc(c.doc, '  ') + `  ${c.name}: number;\n`).join('');
  return `export type Backend = 'cpu' | 'cuda' | 'emu';
export type DType = 'f32' | 'u16' | 'u32' | 'i32' | 'u8';
export type HostArray<D extends DType> = D extends 'f32' ? Float32Array : D extends 'u16' ? Uint16Array : D extends 'u32' ? Uint32Array : D extends 'i32' ? Int32Array : Uint8Array;

/**
 * A block of a GPU backend's memory (templates/addon/device_tensor.h). An array argument of a cuda/emu kernel
 * or core op may be one: it is used in place, with no copy and no wait, where a host array is staged (uploaded,
 * and downloaded after the call if the call writes it). The block returns to the backend's pool when every
 * handle on it is released or collected. The cpu backend refuses device tensors.
 */
export interface DeviceTensor<D extends DType = DType> {
  readonly dtype: D;
  readonly length: number;
  readonly byteLength: number;
  /** 'cuda' or 'emu'; 'released' after release(). */
  readonly backend: string;
  /** Elements [offset, offset + length) on the same memory (length: to the end). */
  view(offset: number, length?: number): DeviceTensor<D>;
  /** src into [offset, offset + src.length); queued (src may be reused at once). */
  upload(src: HostArray<D>, offset?: number): void;
  /** [offset, offset + dst.length) into dst, waiting for the stream; returns dst. */
  download<T extends HostArray<D>>(dst: T, offset?: number): T;
  /** src (same backend and dtype) into [offset, offset + src.length); queued. */
  copyFrom(src: DeviceTensor<D>, offset?: number): void;
  /** Lets go of the memory now rather than at garbage collection. */
  release(): void;
}

/** An array argument: a host array (staged on a GPU backend) or a device tensor of the call's backend. */
export type Tensor<D extends DType> = HostArray<D> | DeviceTensor<D>;

/** The caching pool of a GPU backend (templates/cuda/pool.cuh). */
export interface PoolStats {
  liveBytes: number;
  cachedBytes: number;
  peakBytes: number;
  /** cudaMalloc calls the pool made: no growth in a steady state. */
  deviceAllocs: number;
}

/** addon.device.<backend>: the memory of a compiled GPU backend. */
export interface DeviceApi {
  alloc<D extends DType>(dtype: D, length: number): DeviceTensor<D>;
  /** Waits for every queued launch and copy; throws what a kernel raised. */
  sync(): void;
  /** Cached blocks back to the driver. */
  trim(): void;
  stats(): PoolStats;
}

/** Storage of activations and of α/β: 'f32', or 'u16' holding fp16/bf16 bits. */
export type Storage = 'f32' | 'u16';

/**
 * One layer call (qalora::LayerArgs, templates/common/qalora_common.h); the addon checks every array against these
 * sizes. loraA [rank, in/g] and loraB [out, rank] are needed when rank > 0. S is the storage of alpha and beta.
 */
export interface LayerCallArgs<S extends Storage = Storage> {
  qweight: Tensor<'u32'>;
  alpha: Tensor<S>;
  beta: Tensor<S>;
  loraA?: Tensor<'f32'>;
  loraB?: Tensor<'f32'>;
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
   * inputs and uses integer dot products (\`--activations int8\`); otherwise ignored. Default false: fp32, exact.
   */
  int8Activations?: boolean;
}

/** An argument block with host arrays only: what a caller that reads its arrays back holds. */
export type HostArgs<T> = { [K in keyof T]: Exclude<T[K], DeviceTensor> };

/** The entry points of one specialization on one backend: A is the activation storage, S that of alpha and beta. */
export interface KernelSet<A extends Storage = Storage, S extends Storage = Storage> {
  readonly bits: number;
  readonly group: number;
  /** Storage of α and β: 'fp32' takes f32, 'fp16' u16 of fp16 bits. */
  readonly scales: 'fp32' | 'fp16';
  quantize(w: Tensor<'f32'>, out: number, inFeatures: number, qweight: Tensor<'u32'>, alpha: Tensor<S>, beta: Tensor<S>): void;
  dequantize(qweight: Tensor<'u32'>, alpha: Tensor<S>, beta: Tensor<S>, out: number, inFeatures: number, w: Tensor<'f32'>): void;
  forward(args: LayerCallArgs<S>, x: Tensor<A>, y: Tensor<A>): void;
  backward(args: LayerCallArgs<S>, x: Tensor<A>, dy: Tensor<A>, dx: Tensor<A>, gradA: Tensor<'f32'>, gradB: Tensor<'f32'>): void;
  merge(args: LayerCallArgs<S>, betaOut: Tensor<S>): void;
}

/** The fixed native ops, one per descriptor. */
export interface CoreOps {
${coreOps}}

/** The core ops with a GPU twin (descriptors marked "cuda": true), same signatures. */
export type GpuCoreOps = ${gpu.length ? `Pick<CoreOps, ${gpu.join(' | ')}>` : 'Record<string, never>'};

/** What the emulated CUDA runtime did since the last emuResetCounters() (templates/emu/emu_counters.h). */
export interface EmuCounters {
${counters}}

/** Kernel tables by backend and specialization id; only the backends an addon was built with are present. */
export interface Kernels {
  cpu?: Record<string, KernelSet>;
  cuda?: Record<string, KernelSet>;
  emu?: Record<string, KernelSet>;
}

/** A loaded addon (templates/addon/addon.cpp.njk) whose kernel tables are K. */
export interface AddonOf<K> {
  kernels: K;
  core: CoreOps;
  /** GPU core ops per compiled backend (cuda, emu). */
  coreOn: { cuda?: GpuCoreOps; emu?: GpuCoreOps };
  /** The memory of each compiled GPU backend. */
  device: { cuda?: DeviceApi; emu?: DeviceApi };
  backends(): Backend[];
  /** "ok: <device>, sm_XY" or "unavailable: <reason>"; never throws. */
  cudaStatus(): string;
  /** The emulator's transfer, allocation, synchronization and launch counters; present when emu is compiled. */
  emuCounters?: () => EmuCounters;
  emuResetCounters?: () => void;
  specName: string;
  specHash: string;
  compilerVersion: string;
}
${opts.addonAlias ? '\n/** An addon of any spec. */\nexport type Addon = AddonOf<Kernels>;\n' : ''}`;
}

/** What runtime/native-api.ts must hold: the declarations for the templates' op descriptors. */
export function nativeApiFile(templateRoot = join(repoRoot, 'templates')): string {
  const banner = `// Generated by compiler/native-api.ts from templates/{core,cpu}/*.ops.json, compiler/emu-counters.ts and the
// kernel ABI of templates/common/qalora_common.h; not in git. Do not edit: \`npm run gen:api\` rewrites it.

`;
  return banner + emitNativeApi(loadOpDescriptors(templateRoot), { addonAlias: true });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(NATIVE_API_PATH, nativeApiFile());
  console.log(`wrote ${NATIVE_API_PATH}`);
}
