// LLaMA-shaped GGUF files with random weights for the benchmarks that put qalora beside another engine on the
// same file (bench/scale.ts, bench/decode.ts, bench/train.ts), and the prompt they all feed it. Q4_1
// projections, embedding and untied classifier, F32 norms of 1, the LLaMA-2 tokenizer in the metadata; written
// tensor by tensor with the project's own writer, seeded (the same bytes on every machine) and cached under
// bench/.cache/ keyed by every parameter that changes the bytes.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GGUF_PROJECTION } from '../runtime/formats/gguf-llama.ts';
import { GgmlType, GgufValueType as T, writeGguf, type GgufWriteTensor } from '../runtime/formats/gguf.ts';
import { llamaMetadata, vocabFromTokenizer } from '../runtime/export/gguf.ts';
import { readSentencePieceModel } from '../runtime/tokenizer/spm-model.ts';
import { f16BitsToF32, f32ToF16Bits } from '../runtime/safetensors.ts';
import { fixture } from '../test/fixtures.ts';

const DEFAULT_CACHE = join(dirname(fileURLToPath(import.meta.url)), '.cache');
export const LLAMA2_TOKENIZER = fixture('models/llama2-tokenizer/tokenizer.model');

export interface Shape { dim: number; hidden: number; layers: number; heads: number; kvHeads: number; vocab: number; context: number }
export const SHAPES: Record<string, Shape> = {
  tinyllama: { dim: 2048, hidden: 5632, layers: 22, heads: 32, kvHeads: 4, vocab: 32000, context: 2048 },
  llama7b: { dim: 4096, hidden: 11008, layers: 32, heads: 32, kvHeads: 32, vocab: 32000, context: 4096 },
  // ../shared/bench/torch_qalora.py's `small` (bench/train.ts: the fine-tuning comparison with PyTorch).
  small: { dim: 512, hidden: 1376, layers: 8, heads: 8, kvHeads: 8, vocab: 32000, context: 2048 },
};
// Bump when the bytes a shape produces change (the cache key includes it).
const GENERATOR_VERSION = 2;
const SEED = 1234;

/** xorshift32 from a string: per-tensor streams, so a file is the same bytes on every machine. */
function rng(key: string): () => number {
  let s = createHash('sha256').update(`${SEED}/${key}`).digest().readUInt32LE(0) || 1;
  return () => { s ^= s << 13; s ^= s >>> 17; s ^= s << 5; return s >>> 0; };
}

/**
 * Q4_1 blocks (fp16 d, fp16 m, 16 bytes of nibbles per 32 weights) for an [out, in] weight: random nibbles,
 * d ≈ 1/(4.6·√in) so that y = W·x has about unit scale for a unit-RMS x (uniform q on 0..15 has std ≈ 4.6),
 * and m = −7.5·d so every weight is centred: activations stay finite through 32 layers.
 */
function q41Blocks(name: string, out: number, inF: number): Uint8Array {
  const blocks = (out * inF) / 32;
  const bytes = new Uint8Array(blocks * 20);
  const next = rng(name);
  const words = new Uint32Array(bytes.buffer);
  for (let i = 0; i < words.length; i++) words[i] = next();
  // 64 (d, m) pairs, d spread over ±25%: one fp16 conversion per pair, not per block.
  const base = 1 / (4.6 * Math.sqrt(inF));
  const dm = new Uint16Array(128);
  for (let k = 0; k < 64; k++) {
    const d = f32ToF16Bits(base * (0.75 + (0.5 * k) / 63));
    dm[2 * k] = d;
    dm[2 * k + 1] = f32ToF16Bits(-7.5 * f16BitsToF32(d));
  }
  const h = new Uint16Array(bytes.buffer);
  for (let b = 0; b < blocks; b++) {
    const k = (words[b * 5 + 2] & 63) * 2; // a nibble word of this block picks the pair
    h[b * 10] = dm[k];
    h[b * 10 + 1] = dm[k + 1];
  }
  return bytes;
}

function ones(n: number): Uint8Array {
  return new Uint8Array(new Float32Array(n).fill(1).buffer);
}

export interface GgufPlace {
  /** Where files are kept (default bench/.cache, gitignored). */
  cache?: string;
  /** A SentencePiece tokenizer.model with the shape's vocabulary (default: the LLaMA-2 tokenizer fixture). */
  tokenizer?: string;
}

/** The file for a shape: made once, then reused while every parameter that changes its bytes is the same. */
export function syntheticGguf(shapeName: string, where: GgufPlace = {}): string {
  const c = SHAPES[shapeName];
  if (!c) throw new Error(`unknown shape '${shapeName}' (${Object.keys(SHAPES).join(', ')})`);
  const o = { cache: where.cache ?? DEFAULT_CACHE, tokenizer: where.tokenizer ?? LLAMA2_TOKENIZER };
  const tokBytes = readFileSync(o.tokenizer!);
  const key = createHash('sha256').update(JSON.stringify({ c, GENERATOR_VERSION, SEED })).update(tokBytes).digest('hex').slice(0, 12);
  const path = join(o.cache!, `${shapeName}-q4_1-${key}.gguf`);
  if (existsSync(path)) return path;

  const tok = readSentencePieceModel(o.tokenizer!);
  if (tok.vocabSize !== c.vocab) throw new Error(`${o.tokenizer}: ${tok.vocabSize} tokens, the shape needs ${c.vocab}`);
  const vocab = vocabFromTokenizer(tok);
  // The keys our GGUF export writes, for a Q4_1 model (file_type 3 = MOSTLY_Q4_1).
  const config = { ...c, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: false };
  const kvs = llamaMetadata(config, vocab, { name: `qalora-bench-${shapeName}-random`, fileType: 3 });
  kvs.push(['general.quantization_version', T.U32, 2]);

  // Every tensor is made when the writer reaches it (read()), so memory holds one tensor, not the file.
  const q41 = (name: string, out: number, inF: number): GgufWriteTensor => ({ name, dims: [inF, out], type: GgmlType.Q4_1, read: () => q41Blocks(name, out, inF) });
  const norm = (name: string): GgufWriteTensor => ({ name, dims: [c.dim], type: GgmlType.F32, read: () => ones(c.dim) });
  const kvDim = (c.dim / c.heads) * c.kvHeads;
  const outs = { q: c.dim, k: kvDim, v: kvDim, o: c.dim, gate: c.hidden, up: c.hidden, down: c.dim };
  const ins = { q: c.dim, k: c.dim, v: c.dim, o: c.dim, gate: c.dim, up: c.dim, down: c.hidden };
  const tensors: GgufWriteTensor[] = [q41('token_embd.weight', c.vocab, c.dim)];
  for (let l = 0; l < c.layers; l++) {
    tensors.push(norm(`blk.${l}.attn_norm.weight`), norm(`blk.${l}.ffn_norm.weight`));
    for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) tensors.push(q41(`blk.${l}.${GGUF_PROJECTION[p]}.weight`, outs[p], ins[p]));
  }
  tensors.push(norm('output_norm.weight'), q41('output.weight', c.vocab, c.dim));

  mkdirSync(o.cache!, { recursive: true });
  const t0 = performance.now();
  const size = writeGguf(path, kvs, tensors);
  process.stderr.write(`wrote ${path}: ${(size / 1e9).toFixed(2)} GB in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
  return path;
}

/** A TinyStories prefix of exactly `n` tokens with BOS (the same ids go to llama.cpp; qalora encodes the text). */
export function promptOf(n: number, tokenizer = LLAMA2_TOKENIZER): { text: string; ids: number[] } {
  const tok = readSentencePieceModel(tokenizer);
  const words = readFileSync(fixture('data/tinystories/tinystories-5-stories.txt'), 'utf8').split(/\s+/).filter(Boolean);
  let text = '', ids = [tok.bos];
  for (const w of words) {
    const t = text ? `${text} ${w}` : w;
    const e = tok.encode(t, { bos: true });
    if (e.length > n) break;
    text = t;
    ids = e;
  }
  return { text, ids };
}
