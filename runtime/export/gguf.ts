// LLaMA → GGUF v3 for llama.cpp (metadata keys and tensor names of notes §2, tokenizer included).
// A QA-LoRA layer W = α·q + β with q ≤ 15 (bits 2, 3, 4) or q ≤ 31 and a group size that is a multiple of 32 is
// exactly a Q4_1 (Q5_1) tensor: d = α, m = β repeated in each 32-block of the group — a merged model runs in
// llama.cpp with no re-quantization; only the fp16 rounding of d and m is lost, and the report says how much.
// Layers that cannot be blocks (8-bit q, g not a multiple of 32, rows not a multiple of 32) are written as their
// exact dequantized F32 weights; float models are F32 (or F16 with lossy: true).
import { QaloraError } from '../errors.ts';
import { GgmlType, GgufValueType as T, serializeGguf, writeGguf, type GgufWriteKV, type GgufWriteTensor } from '../formats/gguf.ts';
import { GGUF_PROJECTION } from '../formats/gguf-llama.ts';
import { symmetricBlocks } from '../formats/ggml-blocks.ts';
import type { LlamaWeights, ProjectionName, QuantLinear, TokenTable } from '../model/types.ts';
import { unpackQ, wordsPerRow } from '../reference/numeric.ts';
import { denseWeight } from '../model/dense.ts';
import { scaleValues } from '../model/scales.ts';

export { denseWeight };
import { f16BitsToF32, f32ToF16Bits } from '../safetensors.ts';
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

export type BlockType = 'Q4_0' | 'Q4_1' | 'Q5_1' | 'Q8_0';

/**
 * The ggml block type that holds a quantized layer exactly when there is one (Q4_0 for a Q4_0 file's untouched
 * layers, Q8_0 for a Q8_0 file's: their bytes come back unchanged), else Q4_1 or Q5_1 (exact up to the fp16
 * rounding of d and m), else F32 with the reason it cannot be blocks.
 */
export function blockTypeFor(lin: QuantLinear): { type: BlockType | 'F32'; note?: string } {
  const g = lin.settings.group;
  if (lin.in % 32 !== 0) return { type: 'F32', note: `in = ${lin.in} is not a multiple of 32 (GGUF blocks run along rows)` };
  if (g % 32 !== 0) return { type: 'F32', note: `group ${g} is not a multiple of 32, so one (d, m) per 32-block cannot hold it` };
  const qmax = 2 ** lin.settings.bits - 1;
  if (lin.settings.bits === 4 && symmetricBlocks(lin, -8)) return { type: 'Q4_0' };
  if (qmax <= 15) return { type: 'Q4_1' };
  if (lin.settings.bits === 8 && symmetricBlocks(lin, -128)) return { type: 'Q8_0' };
  // 8-bit layers fit Q5_1 only if no q exceeds 31.
  let max = 0;
  const wpr = wordsPerRow(lin.in, lin.settings.bits);
  for (let o = 0; o < lin.out && max <= 31; o++) for (let i = 0; i < lin.in; i++) max = Math.max(max, unpackQ(lin.qweight, o * wpr, i, lin.settings.bits));
  if (max <= 31) return { type: 'Q5_1' };
  return { type: 'F32', note: `${lin.settings.bits}-bit q values up to ${max} do not fit Q5_1's 5 bits` };
}

const BLOCK_BYTES: Record<BlockType, number> = { Q4_0: 18, Q4_1: 20, Q5_1: 24, Q8_0: 34 };

/**
 * ggml blocks of a quantized layer, and the largest error the fp16 d and m introduce (0 for Q4_0/Q8_0 picked by
 * blockTypeFor, and 0 for a layer with fp16 scales: its α and β are already the file's d and m).
 */
export function encodeBlocks(lin: QuantLinear, type: BlockType): { data: Uint8Array; maxAbsError: number } {
  const { out, in: inF } = lin;
  const { bits, group } = lin.settings;
  const alphas = scaleValues(lin.alpha), betas = scaleValues(lin.beta);
  const L = inF / group, wpr = wordsPerRow(inF, bits);
  const bb = BLOCK_BYTES[type];
  const blocksPerRow = inF / 32;
  const data = new Uint8Array(out * blocksPerRow * bb);
  const dv = new DataView(data.buffer);
  const q = new Uint8Array(32);
  let maxErr = 0;
  for (let o = 0; o < out; o++) {
    for (let blk = 0; blk < blocksPerRow; blk++) {
      const k = Math.floor((blk * 32) / group);
      const alpha = alphas[o * L + k], beta = betas[o * L + k];
      const dBits = f32ToF16Bits(alpha), d = f16BitsToF32(dBits);
      // Q4_0 and Q8_0 have no m: their zero point is the fixed −8d / −128d.
      const m = type === 'Q4_0' ? Math.fround(-8 * d) : type === 'Q8_0' ? Math.fround(-128 * d) : f16BitsToF32(f32ToF16Bits(beta));
      const off = (o * blocksPerRow + blk) * bb;
      dv.setUint16(off, dBits, true);
      for (let j = 0; j < 32; j++) {
        q[j] = unpackQ(lin.qweight, o * wpr, blk * 32 + j, bits);
        const err = Math.abs(Math.fround(q[j] * d) + m - (Math.fround(alpha * q[j]) + beta));
        if (err > maxErr) maxErr = err;
      }
      switch (type) {
        case 'Q4_0':
          for (let j = 0; j < 16; j++) data[off + 2 + j] = q[j] | (q[j + 16] << 4);
          break;
        case 'Q8_0':
          for (let j = 0; j < 32; j++) data[off + 2 + j] = q[j] ^ 0x80; // i8 = q − 128
          break;
        case 'Q4_1':
          dv.setUint16(off + 2, f32ToF16Bits(beta), true);
          for (let j = 0; j < 16; j++) data[off + 4 + j] = q[j] | (q[j + 16] << 4);
          break;
        case 'Q5_1': {
          dv.setUint16(off + 2, f32ToF16Bits(beta), true);
          let qh = 0;
          for (let j = 0; j < 32; j++) qh |= ((q[j] >> 4) & 1) << j;
          dv.setUint32(off + 4, qh >>> 0, true);
          for (let j = 0; j < 16; j++) data[off + 8 + j] = (q[j] & 15) | ((q[j + 16] & 15) << 4);
          break;
        }
      }
    }
  }
  return { data, maxAbsError: maxErr };
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

/**
 * What the file will hold: metadata, and tensors whose converted bytes (F16, blocks, dequantized F32) are made
 * only when the writer reaches them (read()), each filling in its report's error as it is made.
 */
function planGguf(w: LlamaWeights, vocab: GgufVocab, opts: GgufExportOptions): { kvs: GgufWriteKV[]; tensors: GgufWriteTensor[]; reports: TensorReport[] } {
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
      const report: TensorReport = { name, type: 'F16', maxAbsError: 0, note };
      reports.push(report);
      tensors.push({ name, dims: [cols, rows], type: GgmlType.F16, read: () => { const r = f16Tensor(a); report.maxAbsError = r.maxAbsError; return r.data; } });
    } else {
      tensors.push({ name, dims: [cols, rows], type: GgmlType.F32, data: f32Bytes(a) });
      reports.push({ name, type: 'F32', maxAbsError: 0, note });
    }
  };
  let anyQuant = false;
  const quantMatrix = (name: string, lin: QuantLinear) => {
    const choice = blockTypeFor(lin);
    if (choice.type === 'F32') {
      // The exact dequantized weight: larger, but no error.
      tensors.push({ name, dims: [lin.in, lin.out], type: GgmlType.F32, read: () => f32Bytes(denseWeight(lin)) });
      reports.push({ name, type: 'F32', maxAbsError: 0, note: choice.note });
      return;
    }
    anyQuant = true;
    const report: TensorReport = { name, type: choice.type, maxAbsError: 0 };
    reports.push(report);
    const type = choice.type;
    tensors.push({ name, dims: [lin.in, lin.out], type: GgmlType[type], read: () => { const enc = encodeBlocks(lin, type); report.maxAbsError = enc.maxAbsError; return enc.data; } });
  };
  const table = (name: string, t: TokenTable) => {
    if (t instanceof Float32Array) return matrix(name, t, c.vocab, c.dim);
    if (t.kind === 'quant') return quantMatrix(name, t);
    // A half table goes back as the bits it came with: the tensor is byte-identical to the input's.
    const type = t.dtype === 'bf16' ? 'BF16' : 'F16';
    tensors.push({ name, dims: [t.in, t.out], type: GgmlType[type], data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) });
    reports.push({ name, type, maxAbsError: 0 });
  };
  table('token_embd.weight', w.tokEmbedding);
  w.blocks.forEach((b, l) => {
    vec(`blk.${l}.attn_norm.weight`, b.attnNorm);
    vec(`blk.${l}.ffn_norm.weight`, b.ffnNorm);
    for (const p of PROJECTIONS as readonly ProjectionName[]) {
      const lin = b.proj[p];
      const name = `blk.${l}.${GGUF_PROJECTION[p]}.weight`;
      if (lin.kind === 'float') matrix(name, lin.w, lin.out, lin.in);
      else quantMatrix(name, lin);
    }
  });
  vec('output_norm.weight', w.finalNorm);
  if (!c.tiedClassifier && w.classifier !== w.tokEmbedding) table('output.weight', w.classifier);

  // llama.cpp's LLAMA_FTYPE_MOSTLY_*: the block type most tensors use.
  const FTYPE: Record<BlockType, number> = { Q4_0: 2, Q4_1: 3, Q8_0: 7, Q5_1: 9 };
  const counts = new Map<BlockType, number>();
  for (const r of reports) if (r.type in FTYPE) counts.set(r.type as BlockType, (counts.get(r.type as BlockType) ?? 0) + 1);
  const mostly = [...counts].sort((a, b) => b[1] - a[1])[0]?.[0];
  const fileType = anyQuant && mostly ? FTYPE[mostly] : floatType === 'f16' ? 1 : 0;
  const kvs = llamaMetadata(c, vocab, { name: opts.name ?? 'qalora-export', fileType });
  if (anyQuant) kvs.push(['general.quantization_version', T.U32, 2]);
  kvs.push(...(opts.extra ?? []));
  return { kvs, tensors, reports };
}

const maxError = (reports: TensorReport[]) => reports.reduce((a, r) => Math.max(a, r.maxAbsError), 0);

/**
 * The metadata llama.cpp needs for a LLaMA (notes §2): architecture, shape, RoPE and norm constants, and the
 * SentencePiece vocabulary. `fileType` is llama.cpp's LLAMA_FTYPE (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 7 Q8_0, 9 Q5_1).
 */
export function llamaMetadata(c: LlamaWeights['config'], vocab: GgufVocab, o: { name: string; fileType: number }): GgufWriteKV[] {
  const kvs: GgufWriteKV[] = [
    ['general.architecture', T.STRING, 'llama'],
    ['general.name', T.STRING, o.name],
    ['general.alignment', T.U32, 32],
    ['general.file_type', T.U32, o.fileType],
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
  return kvs;
}

/** The GGUF file in memory (tests; writeGgufModel streams instead). */
export function buildGguf(w: LlamaWeights, vocab: GgufVocab, opts: GgufExportOptions = {}): GgufExportResult {
  const { kvs, tensors, reports } = planGguf(w, vocab, opts);
  const chunks = serializeGguf(kvs, tensors, 3, 32);
  return { chunks, bytes: chunks.reduce((a, ch) => a + ch.byteLength, 0), tensors: reports, maxAbsError: maxError(reports) };
}

/** Writes the GGUF file one tensor at a time (atomically): peak memory is the model plus its largest converted tensor. */
export function writeGgufModel(path: string, w: LlamaWeights, vocab: GgufVocab, opts: GgufExportOptions = {}): Omit<GgufExportResult, 'chunks'> {
  const { kvs, tensors, reports } = planGguf(w, vocab, opts);
  const bytes = writeGguf(path, kvs, tensors, 3, 32);
  return { bytes, tensors: reports, maxAbsError: maxError(reports) };
}

