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

/**
 * Storage of α or β [out, in/g]: Float32Array for `scales fp32`, Uint16Array of fp16 bits for `scales fp16`.
 * Never index one for a value: a Uint16Array reads as integers. runtime/model/scales.ts widens and stores them.
 */
export type ScaleArray = Float32Array | Uint16Array;

/**
 * A QA-LoRA base layer: W = α·q + β per (row, group), q packed 'blocked32' (templates/common/qalora_common.h).
 * alpha and beta are stored as settings.scales says (checkScales in runtime/model/scales.ts).
 */
export interface QuantLinear {
  kind: 'quant';
  out: number;
  in: number;
  settings: QaloraSettings;
  qweight: Uint32Array;
  alpha: ScaleArray;
  beta: ScaleArray;
}

export type Linear = FloatLinear | QuantLinear;

/**
 * A projection still in its checkpoint: nothing is read until the model is prepared, and then one tensor at a
 * time, so a float checkpoint is quantized at a peak of the quantized model plus one tensor in fp32, and a
 * quantized file becomes a QA-LoRA base without a float round trip. Loaders produce these; prepareWeights()
 * (runtime/model/prepare.ts) turns every one into a FloatLinear or a QuantLinear.
 */
export interface FileLinear {
  kind: 'file';
  out: number;
  in: number;
  /** What the file stores, for messages: 'F32', 'F16', 'BF16', 'Q4_1', 'GPTQ 4-bit g128', … */
  fileType: string;
  /** Where it is, for messages: "model.gguf: tensor 'blk.0.attn_q.weight'". */
  source: string;
  /** The file's values as W [out, in] in fp32 (dequantized or widened); a fresh array on every call. */
  readFloat(): Float32Array;
  /** Present when the file's blocks are a QA-LoRA base exactly (GGUF Q4_0/Q4_1/Q8_0, GPTQ, our base files). */
  quant?: {
    bits: QaloraSettings['bits'];
    group: number;
    /** The α/β storage that holds the file's scales exactly (fp16 for GGUF blocks, fp32 for GPTQ's −s·z). */
    scales: QaloraSettings['scales'];
    /** The base (q, α, β) with these adapter settings; bits and group stay the file's, scales as asked if exact. */
    read(settings: Partial<QaloraSettings>): QuantLinear;
  };
}

/** What a loader hands over: projections may still be in the file. */
export type LoadedLinear = Linear | FileLinear;

/** Low-rank adapter of one linear layer: A [rank, in/g], B [out, rank]; scale s = alpha / rank. */
export interface Adapter {
  rank: number;
  alpha: number;
  a: Float32Array;
  b: Float32Array;
}

export type ProjectionName = 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down';

/** A block's weights; L = LoadedLinear while projections may still be in the file (a loader's output). */
export interface BlockWeights<L extends LoadedLinear = Linear> {
  attnNorm: Float32Array;
  ffnNorm: Float32Array;
  /** q and k rows in the Meta layout: RoPE rotates adjacent pairs (2i, 2i+1). */
  proj: Record<ProjectionName, L>;
}

/**
 * The token embedding or the classifier, [vocab, dim]: fp32, or kept in the file's group-32 blocks (GGUF
 * Q4_0/Q4_1/Q8_0 map exactly onto a rank-0 QuantLinear with out = vocab, in = dim). The classifier then runs
 * through the quantized kernels and the embedding dequantizes only the rows it looks up — at 32 000 × 2048
 * the fp32 table alone would be 262 MB read per token.
 */
export type TokenTable = Float32Array | QuantLinear | HalfTable;

/**
 * A token table kept in its file's half type (a GGUF F16/BF16 tensor, an HF checkpoint's embed_tokens/lm_head):
 * the fp16 or bf16 bits as they are stored, [vocab, dim]. The CPU classifier reads it directly (core gemm_half),
 * the embedding widens only the rows it looks up; half the bytes of fp32 per token. A GPU backend widens it on
 * upload.
 */
export interface HalfTable {
  kind: 'half';
  dtype: 'fp16' | 'bf16';
  /** [out = vocab, in = dim] */
  out: number;
  in: number;
  data: Uint16Array;
}

export interface LlamaWeights<L extends LoadedLinear = Linear> {
  config: LlamaConfig;
  tokEmbedding: TokenTable; // [vocab, dim]
  blocks: BlockWeights<L>[];
  finalNorm: Float32Array;
  classifier: TokenTable; // [vocab, dim]; the same object as tokEmbedding when tied
}

/** Values in a token table: vocab·dim for both kinds. */
export function tableSize(t: TokenTable): number {
  return t instanceof Float32Array ? t.length : t.out * t.in;
}

/** Adapters by block index and projection. */
export type AdapterSet = Array<Partial<Record<ProjectionName, Adapter>>>;

export type BackendName = 'cpu' | 'cuda' | 'emu';
