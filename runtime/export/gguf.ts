// LLaMA → GGUF v3 for llama.cpp (metadata keys and tensor names of notes §2, tokenizer included).
// A QA-LoRA layer W = α·q + β with q ≤ 15 (bits 2, 3, 4) or q ≤ 31 and a group size that is a multiple of 32 is
// exactly a Q4_1 (Q5_1) tensor: d = α, m = β repeated in each 32-block of the group — a merged model runs in
// llama.cpp with no re-quantization; only the fp16 rounding of d and m is lost, and the report says how much.
// Layers that cannot be blocks (8-bit q, g not a multiple of 32, rows not a multiple of 32) are written as their
// exact dequantized F32 weights; float models are F32 (or F16 with lossy: true).
import { QaloraError } from '../errors.ts';
import { GgmlType, GgufValueType as T, serializeGguf, type GgufWriteKV, type GgufWriteTensor } from '../formats/gguf.ts';
import { GGUF_PROJECTION } from '../formats/gguf-llama.ts';
import type { Linear, LlamaWeights, ProjectionName, QuantLinear } from '../model/types.ts';
import { unpackQ, wordsPerRow } from '../reference/numeric.ts';
import { f16BitsToF32, f32ToF16Bits, writeFileAtomic } from '../safetensors.ts';
import { PROJECTIONS } from '../../dsl/resolved.ts';

export interface GgufVocab {
  tokens: string[];
  scores: number[];
  types: number[];
  bos: number;
  eos: number;
  unk?: number;
}

/** What the exporter needs from a SentencePiece tokenizer (runtime/tokenizer/sentencepiece.ts has it). */
export interface PieceSource {
  vocabSize: number;
  bos: number;
  eos: number;
  piece(id: number): string;
  score(id: number): number;
}

const BYTE_PIECE = /^<0x[0-9A-Fa-f]{2}>$/;

/** A SentencePiece vocabulary in GGUF's form: spaces as U+2581, llama2.c's "\n<s>\n" control pieces renamed. */
export function vocabFromTokenizer(tok: PieceSource): GgufVocab {
  const tokens: string[] = [], scores: number[] = [], types: number[] = [];
  let unk: number | undefined;
  for (let id = 0; id < tok.vocabSize; id++) {
    let p = tok.piece(id);
    let type = 1;
    if (id === tok.bos) { p = '<s>'; type = 3; }
    else if (id === tok.eos) { p = '</s>'; type = 3; }
    else if (p === '<unk>' || (id === 0 && p.trim() === '<unk>')) { p = '<unk>'; type = 2; unk = id; }
    else if (BYTE_PIECE.test(p)) type = 6;
    else p = p.replaceAll(' ', '\u2581');
    tokens.push(p);
    scores.push(tok.score(id));
    types.push(type);
  }
  return { tokens, scores, types, bos: tok.bos, eos: tok.eos, unk };
}

export interface GgufExportOptions {
  name?: string;
  /** Allow inexact float conversions (F16 for float layers); the report gives the error introduced. */
  lossy?: boolean;
  /** Float layers as 'f32' (exact, default) or 'f16' (needs lossy). */
  floatType?: 'f32' | 'f16';
  /** Extra metadata (e.g. qalora.* provenance). */
  extra?: GgufWriteKV[];
}

export interface TensorReport {
  name: string;
  type: string;
  /** Largest |W_file − W_model| over the tensor. */
  maxAbsError: number;
  /** Why a quantized layer was not written as blocks, if it was not. */
  note?: string;
}

export interface GgufExportResult {
  chunks: Uint8Array[];
  bytes: number;
  tensors: TensorReport[];
  maxAbsError: number;
}

/** Picks Q4_1, Q5_1 or F32 for a quantized layer, with the reason when it cannot be blocks. */
export function blockTypeFor(lin: QuantLinear): { type: 'Q4_1' | 'Q5_1' | 'F32'; note?: string } {
  const g = lin.settings.group;
  if (lin.in % 32 !== 0) return { type: 'F32', note: `in = ${lin.in} is not a multiple of 32 (GGUF blocks run along rows)` };
  if (g % 32 !== 0) return { type: 'F32', note: `group ${g} is not a multiple of 32, so one (d, m) per 32-block cannot hold it` };
  const qmax = 2 ** lin.settings.bits - 1;
  if (qmax <= 15) return { type: 'Q4_1' };
  // 8-bit layers fit Q5_1 only if no q exceeds 31.
  let max = 0;
  const wpr = wordsPerRow(lin.in, lin.settings.bits);
  for (let o = 0; o < lin.out && max <= 31; o++) for (let i = 0; i < lin.in; i++) max = Math.max(max, unpackQ(lin.qweight, o * wpr, i, lin.settings.bits));
  if (max <= 31) return { type: 'Q5_1' };
  return { type: 'F32', note: `${lin.settings.bits}-bit q values up to ${max} do not fit Q5_1's 5 bits` };
}

/** Q4_1/Q5_1 blocks of a quantized layer, and the largest error the fp16 d and m introduce. */
export function encodeBlocks(lin: QuantLinear, type: 'Q4_1' | 'Q5_1'): { data: Uint8Array; maxAbsError: number } {
  const { out, in: inF } = lin;
  const { bits, group } = lin.settings;
  const L = inF / group, wpr = wordsPerRow(inF, bits);
  const bb = type === 'Q4_1' ? 20 : 24;
  const blocksPerRow = inF / 32;
  const data = new Uint8Array(out * blocksPerRow * bb);
  const dv = new DataView(data.buffer);
  const q = new Uint8Array(32);
  let maxErr = 0;
  for (let o = 0; o < out; o++) {
    for (let blk = 0; blk < blocksPerRow; blk++) {
      const k = Math.floor((blk * 32) / group);
      const alpha = lin.alpha[o * L + k], beta = lin.beta[o * L + k];
      const dBits = f32ToF16Bits(alpha), mBits = f32ToF16Bits(beta);
      const d = f16BitsToF32(dBits), m = f16BitsToF32(mBits);
      const off = (o * blocksPerRow + blk) * bb;
      dv.setUint16(off, dBits, true);
      dv.setUint16(off + 2, mBits, true);
      for (let j = 0; j < 32; j++) {
        q[j] = unpackQ(lin.qweight, o * wpr, blk * 32 + j, bits);
        const err = Math.abs(Math.fround(q[j] * d) + m - (Math.fround(alpha * q[j]) + beta));
        if (err > maxErr) maxErr = err;
      }
      if (type === 'Q4_1') {
        for (let j = 0; j < 16; j++) data[off + 4 + j] = q[j] | (q[j + 16] << 4);
      } else {
        let qh = 0;
        for (let j = 0; j < 32; j++) qh |= ((q[j] >> 4) & 1) << j;
        dv.setUint32(off + 4, qh >>> 0, true);
        for (let j = 0; j < 16; j++) data[off + 8 + j] = (q[j] & 15) | ((q[j + 16] & 15) << 4);
      }
    }
  }
  return { data, maxAbsError: maxErr };
}

/** W [out, in] of any linear layer in F32 (quantized layers dequantized exactly as the kernels do: α·q + β). */
export function denseWeight(lin: Linear): Float32Array {
  if (lin.kind === 'float') return lin.w;
  const { out, in: inF } = lin;
  const { bits, group } = lin.settings;
  const L = inF / group, wpr = wordsPerRow(inF, bits);
  const w = new Float32Array(out * inF);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inF; i++) {
      const k = Math.floor(i / group);
      w[o * inF + i] = Math.fround(lin.alpha[o * L + k] * unpackQ(lin.qweight, o * wpr, i, bits)) + lin.beta[o * L + k];
    }
  }
  return w;
}

function f32Bytes(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function f16Tensor(a: Float32Array): { data: Uint8Array; maxAbsError: number } {
  const h = new Uint16Array(a.length);
  let maxErr = 0;
  for (let i = 0; i < a.length; i++) {
    h[i] = f32ToF16Bits(a[i]);
    maxErr = Math.max(maxErr, Math.abs(f16BitsToF32(h[i]) - a[i]));
  }
  return { data: new Uint8Array(h.buffer), maxAbsError: maxErr };
}

export function buildGguf(w: LlamaWeights, vocab: GgufVocab, opts: GgufExportOptions = {}): GgufExportResult {
  const c = w.config;
  if (vocab.tokens.length !== c.vocab) throw new QaloraError(`tokenizer has ${vocab.tokens.length} tokens but the model's vocabulary is ${c.vocab}`);
  const floatType = opts.floatType ?? 'f32';
  if (floatType === 'f16' && !opts.lossy) {
    throw new QaloraError('F16 float weights are not exact (fp32 → fp16 rounding); pass --lossy to accept it, the report will give the error');
  }
  const tensors: GgufWriteTensor[] = [];
  const reports: TensorReport[] = [];
  const vec = (name: string, a: Float32Array) => {
    tensors.push({ name, dims: [a.length], type: GgmlType.F32, data: f32Bytes(a) });
    reports.push({ name, type: 'F32', maxAbsError: 0 });
  };
  const matrix = (name: string, a: Float32Array, rows: number, cols: number, note?: string) => {
    if (floatType === 'f16') {
      const r = f16Tensor(a);
      tensors.push({ name, dims: [cols, rows], type: GgmlType.F16, data: r.data });
      reports.push({ name, type: 'F16', maxAbsError: r.maxAbsError, note });
    } else {
      tensors.push({ name, dims: [cols, rows], type: GgmlType.F32, data: f32Bytes(a) });
      reports.push({ name, type: 'F32', maxAbsError: 0, note });
    }
  };
  matrix('token_embd.weight', w.tokEmbedding, c.vocab, c.dim);
  let anyQuant = false;
  w.blocks.forEach((b, l) => {
    vec(`blk.${l}.attn_norm.weight`, b.attnNorm);
    vec(`blk.${l}.ffn_norm.weight`, b.ffnNorm);
    for (const p of PROJECTIONS as readonly ProjectionName[]) {
      const lin = b.proj[p];
      const name = `blk.${l}.${GGUF_PROJECTION[p]}.weight`;
      if (lin.kind === 'float') {
        matrix(name, lin.w, lin.out, lin.in);
        continue;
      }
      const choice = blockTypeFor(lin);
      if (choice.type === 'F32') {
        // The exact dequantized weight: larger, but no error.
        tensors.push({ name, dims: [lin.in, lin.out], type: GgmlType.F32, data: f32Bytes(denseWeight(lin)) });
        reports.push({ name, type: 'F32', maxAbsError: 0, note: choice.note });
        continue;
      }
      anyQuant = true;
      const enc = encodeBlocks(lin, choice.type);
      tensors.push({ name, dims: [lin.in, lin.out], type: GgmlType[choice.type], data: enc.data });
      reports.push({ name, type: choice.type, maxAbsError: enc.maxAbsError });
    }
  });
  vec('output_norm.weight', w.finalNorm);
  if (!c.tiedClassifier && w.classifier !== w.tokEmbedding) matrix('output.weight', w.classifier, c.vocab, c.dim);

  const fileType = anyQuant ? (reports.some((r) => r.type === 'Q4_1') ? 3 : 9) : floatType === 'f16' ? 1 : 0;
  const kvs: GgufWriteKV[] = [
    ['general.architecture', T.STRING, 'llama'],
    ['general.name', T.STRING, opts.name ?? 'qalora-export'],
    ['general.alignment', T.U32, 32],
    ['general.file_type', T.U32, fileType],
    ['llama.vocab_size', T.U32, c.vocab],
    ['llama.context_length', T.U32, c.context],
    ['llama.embedding_length', T.U32, c.dim],
    ['llama.block_count', T.U32, c.layers],
    ['llama.feed_forward_length', T.U32, c.hidden],
    ['llama.rope.dimension_count', T.U32, c.dim / c.heads],
    ['llama.attention.head_count', T.U32, c.heads],
    ['llama.attention.head_count_kv', T.U32, c.kvHeads],
    ['llama.attention.layer_norm_rms_epsilon', T.F32, c.normEps],
    ['llama.rope.freq_base', T.F32, c.ropeTheta],
    ['tokenizer.ggml.model', T.STRING, 'llama'],
    ['tokenizer.ggml.tokens', T.ARRAY, vocab.tokens, T.STRING],
    ['tokenizer.ggml.scores', T.ARRAY, Float32Array.from(vocab.scores), T.F32],
    ['tokenizer.ggml.token_type', T.ARRAY, Int32Array.from(vocab.types), T.I32],
    ['tokenizer.ggml.bos_token_id', T.U32, vocab.bos],
    ['tokenizer.ggml.eos_token_id', T.U32, vocab.eos],
    ['tokenizer.ggml.add_bos_token', T.BOOL, true],
    ['tokenizer.ggml.add_eos_token', T.BOOL, false],
  ];
  if (vocab.unk !== undefined) kvs.push(['tokenizer.ggml.unknown_token_id', T.U32, vocab.unk]);
  if (anyQuant) kvs.push(['general.quantization_version', T.U32, 2]);
  kvs.push(...(opts.extra ?? []));
  const chunks = serializeGguf(kvs, tensors, 3, 32);
  return {
    chunks,
    bytes: chunks.reduce((a, ch) => a + ch.byteLength, 0),
    tensors: reports,
    maxAbsError: reports.reduce((a, r) => Math.max(a, r.maxAbsError), 0),
  };
}

export function writeGgufModel(path: string, w: LlamaWeights, vocab: GgufVocab, opts: GgufExportOptions = {}): GgufExportResult {
  const r = buildGguf(w, vocab, opts);
  writeFileAtomic(path, r.chunks);
  return r;
}

