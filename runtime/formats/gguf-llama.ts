// A GGUF file as a LLaMA: config from llama.* metadata, tensors by their llama.cpp names (q/k already in the
// Meta layout), and the SentencePiece vocabulary from tokenizer.ggml.*.
import { QaloraError } from '../errors.ts';
import type { BlockWeights, FileLinear, LlamaConfig, LlamaWeights, LoadedLinear, ProjectionName, TokenTable } from '../model/types.ts';
import { SentencePieceBpe } from '../tokenizer/sentencepiece.ts';
import { blocksToQuantLinear, EXACT_BLOCK_TYPES } from './ggml-blocks.ts';
import { GgmlType, ggmlTypeName } from './ggml-types.ts';
import { type GgufFile, ggufGet, ggufNumber, ggufTensorF32 } from './gguf.ts';

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

/**
 * A GGUF tensor as a loader's projection: nothing is read until the model is prepared. Q4_0, Q4_1 and Q8_0
 * offer their blocks as a QA-LoRA base exactly (ggml-blocks.ts); every type can be read as fp32.
 */
export function ggufLinear(f: GgufFile, name: string, out: number, inF: number): FileLinear {
  const t = f.tensors.get(name);
  if (!t) throw new QaloraError(`${f.path}: missing tensor '${name}' (expected dims [${inF},${out}])`);
  if (t.dims.length !== 2 || t.dims[0] !== inF || t.dims[1] !== out) {
    throw new QaloraError(`${f.path}: tensor '${name}' has dims [${t.dims}], expected [${inF},${out}]`);
  }
  const exact = EXACT_BLOCK_TYPES.get(t.type);
  return {
    kind: 'file', out, in: inF, fileType: ggmlTypeName(t.type), source: `${f.path}: tensor '${name}'`,
    readFloat: () => ggufTensorF32(f, name, [inF, out]),
    quant: exact && inF % 32 === 0
      ? { bits: exact.bits, group: 32, scales: 'fp16', read: (settings) => blocksToQuantLinear(t.type, t.readInto, out, inF, settings)! }
      : undefined,
  };
}

/**
 * The embedding or classifier in the file's blocks when they are exact (rank 0: no adapter; d and m kept as the
 * file's fp16 bits), F16/BF16 kept as their bits (HalfTable), else fp32.
 */
function ggufTable(f: GgufFile, name: string, vocab: number, dim: number): TokenTable {
  const lin = ggufLinear(f, name, vocab, dim);
  if (lin.quant) return lin.quant.read({ rank: 0, alpha: 0, dropout: 0, scales: 'fp16' });
  const t = f.tensors.get(name)!;
  const dtype = t.type === GgmlType.F16 ? 'fp16' : t.type === GgmlType.BF16 ? 'bf16' : undefined;
  if (!dtype) return lin.readFloat();
  const data = new Uint16Array(vocab * dim);
  t.readInto(new Uint8Array(data.buffer), 0);
  return { kind: 'half', dtype, out: vocab, in: dim, data };
}

/**
 * The model in a GGUF file. Projections stay in the file (FileLinear: prepareWeights decides whether to keep
 * the blocks or read floats); norms are read now; the embedding and the classifier are kept in their blocks
 * when those are exact (Q4_0/Q4_1/Q8_0) or in their half type (F16/BF16), else read as fp32.
 */
export function ggufToLlama(f: GgufFile): LlamaWeights<LoadedLinear> {
  const config = ggufLlamaConfig(f);
  const { dim, hidden, layers, heads, kvHeads, vocab } = config;
  const kvDim = (dim / heads) * kvHeads;
  const get = (name: string, dims: number[]) => ggufTensorF32(f, name, dims);
  const tokEmbedding = ggufTable(f, 'token_embd.weight', vocab, dim);
  const shapes: Record<ProjectionName, [number, number]> = {
    q: [dim, dim], k: [kvDim, dim], v: [kvDim, dim], o: [dim, dim], gate: [hidden, dim], up: [hidden, dim], down: [dim, hidden],
  };
  const blocks: BlockWeights<LoadedLinear>[] = [];
  for (let l = 0; l < layers; l++) {
    const proj = {} as Record<ProjectionName, LoadedLinear>;
    for (const p of Object.keys(shapes) as ProjectionName[]) {
      const [out, inp] = shapes[p];
      proj[p] = ggufLinear(f, `blk.${l}.${GGUF_PROJECTION[p]}.weight`, out, inp);
    }
    blocks.push({ attnNorm: get(`blk.${l}.attn_norm.weight`, [dim]), ffnNorm: get(`blk.${l}.ffn_norm.weight`, [dim]), proj });
  }
  const finalNorm = get('output_norm.weight', [dim]);
  // No output.weight, or one whose bytes equal the embedding's (converters copy a tied one): share the table.
  let classifier = tokEmbedding;
  const out = f.tensors.get('output.weight');
  const emb = f.tensors.get('token_embd.weight')!;
  if (out && !(out.type === emb.type && Buffer.from(out.read()).equals(Buffer.from(emb.read())))) {
    classifier = ggufTable(f, 'output.weight', vocab, dim);
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
