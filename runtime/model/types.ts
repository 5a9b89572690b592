// What a loaded LLaMA is, independent of the file it came from and of the backend that runs it.
// Loaders (runtime/formats/) produce LlamaWeights; runtime/model/ runs them; train/, merge, export/ and serve/
// build on the LlamaModel interface below.

import type { ModelShape, QaloraSettings } from '../../dsl/resolved.ts';

/** The shape a spec describes, plus what only a checkpoint knows. */
export interface LlamaConfig extends ModelShape {
  /** Classifier shares the token embedding. */
  tiedClassifier: boolean;
}

/** A float linear layer, W [out, in] row-major. */
export interface FloatLinear {
  kind: 'float';
  out: number;
  in: number;
  w: Float32Array;
}

/** A QA-LoRA base layer: W = α·q + β per (row, group), q packed 'blocked32' (templates/common/qalora_common.h). */
export interface QuantLinear {
  kind: 'quant';
  out: number;
  in: number;
  settings: QaloraSettings;
  qweight: Uint32Array;
  alpha: Float32Array;
  beta: Float32Array;
}

export type Linear = FloatLinear | QuantLinear;

/** Low-rank adapter of one linear layer: A [rank, in/g], B [out, rank]; scale s = alpha / rank. */
export interface Adapter {
  rank: number;
  alpha: number;
  a: Float32Array;
  b: Float32Array;
}

export type ProjectionName = 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down';

export interface BlockWeights {
  attnNorm: Float32Array;
  ffnNorm: Float32Array;
  /** q and k rows in the Meta layout: RoPE rotates adjacent pairs (2i, 2i+1). */
  proj: Record<ProjectionName, Linear>;
}

export interface LlamaWeights {
  config: LlamaConfig;
  tokEmbedding: Float32Array; // [vocab, dim]
  blocks: BlockWeights[];
  finalNorm: Float32Array;
  classifier: Float32Array; // [vocab, dim]; the same array as tokEmbedding when tied
}

/** Adapters by block index and projection. */
export type AdapterSet = Array<Partial<Record<ProjectionName, Adapter>>>;

export type BackendName = 'cpu' | 'cuda' | 'emu';
