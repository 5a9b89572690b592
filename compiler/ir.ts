// The kernel plan: the compiler's intermediate representation between a resolved spec and rendered sources.
// Each distinct specialization appears once however many layers use it; layers point at it by id.

import type { ActDType, Bits, Pool, ResolvedSpec, ScaleDType } from '../dsl/resolved.ts';

/** Compile-time constants of one specialization. Rank, in/out features and M are runtime arguments. */
export interface SpecializationKey {
  bits: Bits;
  group: number;
  dtype: ActDType;
  pool: Pool;
  /** Storage of α and β: fp32, or fp16 raw bits. */
  scales: ScaleDType;
}

/** Blocking of the CPU kernels (see templates/cpu). */
export interface CpuConfig {
  /** GEMM cache blocking: rows of x (MC), output features (NC), inputs (KC, a multiple of the group when g | KC). */
  mc: number;
  nc: number;
  kc: number;
  /** Below this many rows forward uses the dequantize-free GEMV path. */
  gemvMaxRows: number;
  /** Group size is a multiple of 32: the SIMD fast path applies. */
  fastPath: boolean;
}

/** Launch configuration of the CUDA kernels (see templates/cuda). */
export interface CudaConfig {
  archs: string[];
  gemv: { threads: number; rowsPerBlock: number; maxRows: number };
  /** Tensor-core tile: block tile BM×BN×BK, warps per block, pipeline stages, dynamic shared bytes. */
  gemm: { bm: number; bn: number; bk: number; warps: number; stages: number; smemBytes: number };
  /** Registers per thread the plan assumes for its occupancy target; `inspect` checks ptxas against it. */
  maxRegisters: number;
}

export interface Specialization extends SpecializationKey {
  /** e.g. 'b4_g32_fp16_mean', 'b4_g32_fp32_mean_s16' (fp16 scales): a C identifier, stable for a key. */
  id: string;
  /** Packed layout of q (see docs/ARCHITECTURE.md): 'blocked32' — b u32 words per 32 inputs, per row. */
  layout: 'blocked32';
  cpu: CpuConfig | null;
  cuda: CudaConfig | null;
  /** Names of the layers that use it. */
  layers: string[];
}

export interface PlannedLayer {
  name: string;
  specialization: string;
  inFeatures: number;
  outFeatures: number;
  rank: number;
  alpha: number;
  dropout: number;
  /** s = alpha / rank (0 when rank is 0). */
  scale: number;
  /** c in p = c·Σ_group x. */
  poolScale: number;
  count: number;
}

export interface KernelPlan {
  spec: ResolvedSpec;
  /** sha256 of the spec's canonical JSON and the compiler version. */
  specHash: string;
  compilerVersion: string;
  specializations: Specialization[];
  layers: PlannedLayer[];
}
