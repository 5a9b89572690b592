// The validated, defaults-applied form of a spec: what the DSL hands to the compiler.
// Everything here is plain data (JSON-serialisable) so it can be hashed and written into manifests.

export type Bits = 2 | 3 | 4 | 8;
export type ActDType = 'fp32' | 'fp16' | 'bf16';
/** How the adapter pools x over a group: p = c · Σ_group x with c = 1/g (mean), 1 (sum), L/g (peft). */
export type Pool = 'mean' | 'sum' | 'peft';
/** How α and β are stored: fp32, or fp16 (raw uint16 bits; what GGUF Q4_1 holds, 2 bits per weight less at g 32). */
export type ScaleDType = 'fp32' | 'fp16';
/** A token table's storage (dsl/defaults.ts TABLE_TYPES); `file` keeps the checkpoint's own. */
export type TableType = 'file' | 'fp32' | 'fp16' | 'bf16' | 'q8_0' | 'q4_1' | 'q4_0';
export interface TableTypes {
  embedding: TableType;
  classifier: TableType;
}
export type Projection = 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down';
export const PROJECTIONS: readonly Projection[] = ['q', 'k', 'v', 'o', 'gate', 'up', 'down'];

export interface QaloraSettings {
  bits: Bits;
  group: number;
  /** 0 means: quantized, but no adapter on this layer. */
  rank: number;
  alpha: number;
  dropout: number;
  pool: Pool;
  dtype: ActDType;
  scales: ScaleDType;
}

export interface ModelShape {
  dim: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocab: number;
  context: number;
  ropeTheta: number;
  normEps: number;
}

export interface ResolvedLayer extends QaloraSettings {
  /** 'q', 'k', …, 'down' for a model spec (shared by all transformer blocks); the user's name otherwise. */
  name: string;
  inFeatures: number;
  outFeatures: number;
  projection?: Projection;
  /** How many instances of this layer the model has (n_layers for a projection, 1 for a standalone layer). */
  count: number;
}

export interface Targets {
  cpu: boolean;
  /** null: no CUDA target. archs like 'sm_80', 'sm_90', 'sm_90a'. */
  cuda: { archs: string[] } | null;
}

export interface ResolvedSpec {
  /** The spec's name (from `model NAME` / `spec NAME`, else the file's base name); names generated/<name>/. */
  name: string;
  file: string;
  model?: ModelShape;
  /** A model's token tables, when the spec names their type (`tables …`); absent: as the checkpoint stores them. */
  tables?: TableTypes;
  layers: ResolvedLayer[];
  targets: Targets;
}

/** p = poolScale · Σ_{i∈group} x_i. */
export function poolScale(pool: Pool, group: number, inFeatures: number): number {
  if (pool === 'mean') return 1 / group;
  if (pool === 'sum') return 1;
  return inFeatures / group / group;
}
