// A GGUF file as a LLaMA: config from llama.* metadata, tensors by their llama.cpp names (q/k already in the
// Meta layout), and the SentencePiece vocabulary from tokenizer.ggml.*.
import type { QaloraSettings } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { BlockWeights, LlamaConfig, LlamaWeights, Linear, ProjectionName, QuantLinear } from '../model/types.ts';
import { packQ, wordsPerRow } from '../reference/numeric.ts';
import { f16BitsToF32 } from '../safetensors.ts';
import { SentencePieceBpe } from '../tokenizer/sentencepiece.ts';
import { GgmlType } from './ggml-types.ts';
import { type GgufFile, type GgufTensor, ggufGet, ggufNumber, ggufTensorF32 } from './gguf.ts';

/** GGUF tensor name suffix of each projection in blk.N. */
export const GGUF_PROJECTION: Record<ProjectionName, string> = {
  q: 'attn_q', k: 'attn_k', v: 'attn_v', o: 'attn_output', gate: 'ffn_gate', up: 'ffn_up', down: 'ffn_down',
};

/** The shortest decimal that rounds to the same float32: 9.99999974e-6 stored as f32 reads back as 1e-5. */
export function shortestF32(x: number): number {
  for (let p = 1; p <= 17; p++) {
    const y = Number(x.toPrecision(p));
    if (Math.fround(y) === Math.fround(x)) return y;
  }
  return x;
}

export function ggufLlamaConfig(f: GgufFile): LlamaConfig {
  const arch = ggufGet<string>(f, 'general.architecture');
  if (arch !== 'llama') throw new QaloraError(`${f.path}: general.architecture is '${arch}', only 'llama' is supported`);
  const dim = ggufNumber(f, 'llama.embedding_length');
  const heads = ggufNumber(f, 'llama.attention.head_count');
  const emb = f.tensors.get('token_embd.weight');
  if (!emb) throw new QaloraError(`${f.path}: missing tensor 'token_embd.weight'`);
  const config: LlamaConfig = {
    dim,
    hidden: ggufNumber(f, 'llama.feed_forward_length'),
    layers: ggufNumber(f, 'llama.block_count'),
    heads,
    kvHeads: ggufNumber(f, 'llama.attention.head_count_kv', heads),
    vocab: emb.dims[1],
    context: ggufNumber(f, 'llama.context_length'),
    ropeTheta: shortestF32(ggufNumber(f, 'llama.rope.freq_base', 10000)),
    normEps: shortestF32(ggufNumber(f, 'llama.attention.layer_norm_rms_epsilon', 1e-5)),
    tiedClassifier: false,
  };
  if (dim % heads !== 0 || heads % config.kvHeads !== 0) {
    throw new QaloraError(`${f.path}: embedding_length ${dim}, head_count ${heads}, head_count_kv ${config.kvHeads} are inconsistent`);
  }
  const ropeDims = ggufNumber(f, 'llama.rope.dimension_count', dim / heads);
  if (ropeDims !== dim / heads) throw new QaloraError(`${f.path}: llama.rope.dimension_count ${ropeDims} ≠ head size ${dim / heads} (partial RoPE is not supported)`);
  return config;
}

function sameBytes(a: Float32Array, b: Float32Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

export interface GgufLlamaOptions {
  /**
   * 'dequantize' (default): every projection becomes a FloatLinear. 'keep': Q4_0, Q4_1 and Q8_0 projections
   * become QuantLinear layers (4 or 8 bits, group 32) holding exactly the file's values, not re-quantized.
   */
  quantized?: 'dequantize' | 'keep';
  /** Adapter settings of kept QuantLinear layers (bits and group come from the file). */
  settings?: Partial<QaloraSettings>;
}

/**
 * A Q4_0 / Q4_1 / Q8_0 tensor [out, in] as our (q, α, β) with group 32, exactly: Q4_1 is α = d, β = m;
 * Q4_0 ((q − 8)·d) is α = d, β = −8d; Q8_0 (i8·d) is q + 128 with α = d, β = −128d (all products exact in fp32).
 * Null for other types.
 */
export function ggmlToQuantLinear(t: GgufTensor, settings: Partial<QaloraSettings> = {}): QuantLinear | null {
  const kind = t.type === GgmlType.Q4_0 ? 'q4_0' : t.type === GgmlType.Q4_1 ? 'q4_1' : t.type === GgmlType.Q8_0 ? 'q8_0' : null;
  if (!kind || t.dims.length !== 2) return null;
  const [inF, out] = t.dims;
  const bits = kind === 'q8_0' ? 8 : 4;
  const L = inF / 32, wpr = wordsPerRow(inF, bits);
  const bb = kind === 'q4_0' ? 18 : kind === 'q4_1' ? 20 : 34;
  const dv = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  const qweight = new Uint32Array(out * wpr);
  const alpha = new Float32Array(out * L);
  const beta = new Float32Array(out * L);
  for (let o = 0; o < out; o++) {
    for (let k = 0; k < L; k++) {
      const base = (o * L + k) * bb;
      const d = f16BitsToF32(dv.getUint16(base, true));
      alpha[o * L + k] = d;
      if (kind === 'q8_0') {
        beta[o * L + k] = -128 * d;
        for (let j = 0; j < 32; j++) packQ(qweight, o * wpr, k * 32 + j, 8, dv.getInt8(base + 2 + j) + 128);
        continue;
      }
      beta[o * L + k] = kind === 'q4_1' ? f16BitsToF32(dv.getUint16(base + 2, true)) : -8 * d;
      const qs = base + (kind === 'q4_1' ? 4 : 2);
      for (let j = 0; j < 16; j++) {
        const byte = t.data[qs + j];
        packQ(qweight, o * wpr, k * 32 + j, 4, byte & 15);
        packQ(qweight, o * wpr, k * 32 + j + 16, 4, byte >> 4);
      }
    }
  }
  const full: QaloraSettings = { rank: 0, alpha: 0, dropout: 0, pool: 'mean', dtype: 'fp32', ...settings, bits, group: 32 };
  return { kind: 'quant', out, in: inF, settings: full, qweight, alpha, beta };
}

export function ggufToLlama(f: GgufFile, opts: GgufLlamaOptions = {}): LlamaWeights {
  const config = ggufLlamaConfig(f);
  const { dim, hidden, layers, heads, kvHeads, vocab } = config;
  const kvDim = (dim / heads) * kvHeads;
  const get = (name: string, dims: number[]) => ggufTensorF32(f, name, dims);
  const tokEmbedding = get('token_embd.weight', [dim, vocab]);
  const shapes: Record<ProjectionName, [number, number]> = {
    q: [dim, dim], k: [kvDim, dim], v: [kvDim, dim], o: [dim, dim], gate: [hidden, dim], up: [hidden, dim], down: [dim, hidden],
  };
  const blocks: BlockWeights[] = [];
  for (let l = 0; l < layers; l++) {
    const proj = {} as Record<ProjectionName, Linear>;
    for (const p of Object.keys(shapes) as ProjectionName[]) {
      const [out, inp] = shapes[p];
      const name = `blk.${l}.${GGUF_PROJECTION[p]}.weight`;
      const t = f.tensors.get(name);
      const kept = opts.quantized === 'keep' && t && t.dims.join() === `${inp},${out}` ? ggmlToQuantLinear(t, opts.settings) : null;
      proj[p] = kept ?? { kind: 'float', out, in: inp, w: get(name, [inp, out]) };
    }
    blocks.push({ attnNorm: get(`blk.${l}.attn_norm.weight`, [dim]), ffnNorm: get(`blk.${l}.ffn_norm.weight`, [dim]), proj });
  }
  const finalNorm = get('output_norm.weight', [dim]);
  // No output.weight, or one identical to the embedding (converters copy a tied one): share the array.
  let classifier = tokEmbedding;
  if (f.tensors.has('output.weight')) {
    const out = get('output.weight', [dim, vocab]);
    if (!sameBytes(out, tokEmbedding)) classifier = out;
  }
  config.tiedClassifier = classifier === tokEmbedding;
  return { config, tokEmbedding, blocks, finalNorm, classifier };
}

/** The SentencePiece vocabulary in tokenizer.ggml.* (model "llama"). */
export function ggufTokenizer(f: GgufFile): SentencePieceBpe {
  const model = ggufGet<string>(f, 'tokenizer.ggml.model');
  if (model !== 'llama') {
    throw new QaloraError(`${f.path}: tokenizer.ggml.model is '${model}'; only SentencePiece ('llama') vocabularies are supported — pass --tokenizer`);
  }
  const tokens = ggufGet<string[]>(f, 'tokenizer.ggml.tokens');
  if (!Array.isArray(tokens)) throw new QaloraError(`${f.path}: tokenizer.ggml.tokens should be an array of strings`);
  const n = tokens.length;
  const scoresKv = f.metadata.get('tokenizer.ggml.scores');
  const scores = scoresKv ? Array.from(scoresKv.value as ArrayLike<number>, Number) : new Array<number>(n).fill(0);
  const typesKv = f.metadata.get('tokenizer.ggml.token_type');
  const types = typesKv ? Array.from(typesKv.value as ArrayLike<number>, Number) : undefined;
  const enc = new TextEncoder();
  return new SentencePieceBpe({
    pieces: tokens.map((t) => enc.encode(t.replaceAll('\u2581', ' '))),
    scores,
    types,
    bos: ggufNumber(f, 'tokenizer.ggml.bos_token_id', 1),
    eos: ggufNumber(f, 'tokenizer.ggml.eos_token_id', 2),
    source: `${f.path} (tokenizer.ggml)`,
  });
}
