// llama2.c checkpoints. v0 (legacy): 7 × i32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size
// (negative: separate classifier), seq_len}, then f32 tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
// rms_final, the legacy RoPE table (skipped), wcls when unshared. v1: u32 magic "ak42", i32 version 1, the same
// 7 i32, u8 shared_classifier, padded to 256 bytes; then norms first (rms_att, rms_ffn, rms_final), tok_emb,
// wq … w3, wcls when unshared. w1 = gate, w2 = down, w3 = up; matrices [out, in] row-major, q/k in Meta layout.
import { readFileSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import type { BlockWeights, FloatLinear, LlamaConfig, LlamaWeights } from '../model/types.ts';

export const LLAMA2C_MAGIC = 0x616b3432;

export function readLlama2c(path: string): LlamaWeights {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new QaloraError(`${path}: cannot read llama2.c checkpoint (${(e as Error).message})`);
  }
  return parseLlama2c(buf, path);
}

/** Reads f32 runs in file order, naming the tensor when the file ends early. */
class F32Cursor {
  constructor(private readonly buf: Buffer, private offset: number, private readonly path: string) {}
  take(n: number, what: string): Float32Array {
    const bytes = n * 4;
    if (this.offset + bytes > this.buf.length) {
      throw new QaloraError(`${this.path}: truncated in tensor ${what}: needs ${bytes} bytes at offset ${this.offset}, file has ${this.buf.length}`);
    }
    const out = new Float32Array(n);
    new Uint8Array(out.buffer).set(this.buf.subarray(this.offset, this.offset + bytes));
    this.offset += bytes;
    return out;
  }
  skip(n: number, what: string): void {
    if (this.offset + n * 4 > this.buf.length) {
      throw new QaloraError(`${this.path}: truncated in ${what}: needs ${n * 4} bytes at offset ${this.offset}, file has ${this.buf.length}`);
    }
    this.offset += n * 4;
  }
  get position(): number {
    return this.offset;
  }
}

export function parseLlama2c(buf: Buffer, path: string): LlamaWeights {
  if (buf.length < 28) throw new QaloraError(`${path}: too short for a llama2.c checkpoint (${buf.length} bytes; the header alone is 28)`);
  const v1 = buf.readUInt32LE(0) === LLAMA2C_MAGIC;
  let headerBytes = 28;
  let shared: boolean;
  let h: number[];
  if (v1) {
    const version = buf.readInt32LE(4);
    if (version !== 1) {
      throw new QaloraError(`${path}: llama2.c checkpoint version ${version} is not supported (only v0 legacy and v1 float32; v2 is llama2.c's Q8_0 export)`);
    }
    if (buf.length < 256) throw new QaloraError(`${path}: truncated llama2.c v1 header (${buf.length} of 256 bytes)`);
    h = Array.from({ length: 7 }, (_, i) => buf.readInt32LE(8 + 4 * i));
    shared = buf[36] !== 0;
    headerBytes = 256;
  } else {
    h = Array.from({ length: 7 }, (_, i) => buf.readInt32LE(4 * i));
    shared = h[5] > 0;
    h[5] = Math.abs(h[5]);
  }
  const [dim, hidden, layers, heads, kvHeads, vocab, context] = h;
  const bad = (why: string) => new QaloraError(`${path}: not a llama2.c checkpoint (${why}; header ${JSON.stringify({ dim, hidden, layers, heads, kvHeads, vocab, context })})`);
  for (const [k, v] of Object.entries({ dim, hidden, layers, heads, kvHeads, vocab, context })) {
    if (!(v > 0 && v < 1 << 24)) throw bad(`${k} = ${v}`);
  }
  if (dim % heads !== 0) throw bad(`dim ${dim} is not a multiple of n_heads ${heads}`);
  if (heads % kvHeads !== 0) throw bad(`n_heads ${heads} is not a multiple of n_kv_heads ${kvHeads}`);
  const headSize = dim / heads;
  const kvDim = kvHeads * headSize;
  const config: LlamaConfig = { dim, hidden, layers, heads, kvHeads, vocab, context, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: shared };

  const c = new F32Cursor(buf, headerBytes, path);
  const perLayer = (n: number, what: string) => Array.from({ length: layers }, (_, l) => c.take(n, `${what}[${l}]`));
  const lin = (out: number, inp: number, what: string) =>
    perLayer(out * inp, what).map((w): FloatLinear => ({ kind: 'float', out, in: inp, w }));

  let tokEmbedding: Float32Array;
  let attnNorm: Float32Array[], ffnNorm: Float32Array[], finalNorm: Float32Array;
  if (v1) {
    attnNorm = perLayer(dim, 'rms_att');
    ffnNorm = perLayer(dim, 'rms_ffn');
    finalNorm = c.take(dim, 'rms_final');
    tokEmbedding = c.take(vocab * dim, 'tok_embeddings');
  } else {
    tokEmbedding = c.take(vocab * dim, 'tok_embeddings');
    attnNorm = perLayer(dim, 'rms_att');
    finalNorm = new Float32Array(0); // read after the matrices in v0
    ffnNorm = [];
  }
  const wq = lin(dim, dim, 'wq');
  const wk = lin(kvDim, dim, 'wk');
  const wv = lin(kvDim, dim, 'wv');
  const wo = lin(dim, dim, 'wo');
  if (!v1) ffnNorm = perLayer(dim, 'rms_ffn');
  const w1 = lin(hidden, dim, 'w1');
  const w2 = lin(dim, hidden, 'w2');
  const w3 = lin(hidden, dim, 'w3');
  if (!v1) {
    finalNorm = c.take(dim, 'rms_final');
    c.skip(context * headSize, 'freq_cis (legacy RoPE table)');
  }
  const classifier = shared ? tokEmbedding : c.take(vocab * dim, 'wcls');
  if (c.position !== buf.length) {
    throw new QaloraError(`${path}: ${buf.length - c.position} bytes left after the last tensor: the header (${JSON.stringify(config)}) does not describe this file`);
  }
  const blocks: BlockWeights[] = Array.from({ length: layers }, (_, l) => ({
    attnNorm: attnNorm[l],
    ffnNorm: ffnNorm[l],
    proj: { q: wq[l], k: wk[l], v: wv[l], o: wo[l], gate: w1[l], down: w2[l], up: w3[l] },
  }));
  return { config, tokEmbedding, blocks, finalNorm, classifier };
}

/** Serialises weights as a llama2.c v1 ("ak42") file; float projections only. */
export function serializeLlama2cV1(w: LlamaWeights): Buffer {
  const { dim, hidden, layers, heads, kvHeads, vocab, context, tiedClassifier } = w.config;
  const header = Buffer.alloc(256);
  header.writeUInt32LE(LLAMA2C_MAGIC, 0);
  header.writeInt32LE(1, 4);
  [dim, hidden, layers, heads, kvHeads, vocab, context].forEach((v, i) => header.writeInt32LE(v, 8 + 4 * i));
  header[36] = tiedClassifier ? 1 : 0;
  const mat = (p: 'q' | 'k' | 'v' | 'o' | 'gate' | 'down' | 'up') =>
    w.blocks.map((b, l) => {
      const lin = b.proj[p];
      if (lin.kind !== 'float') throw new QaloraError(`llama2.c export: block ${l} projection ${p} is quantized; llama2.c v1 holds float weights only`);
      return lin.w;
    });
  const arrays: Float32Array[] = [
    ...w.blocks.map((b) => b.attnNorm), ...w.blocks.map((b) => b.ffnNorm), w.finalNorm, w.tokEmbedding,
    ...mat('q'), ...mat('k'), ...mat('v'), ...mat('o'), ...mat('gate'), ...mat('down'), ...mat('up'),
    ...(tiedClassifier ? [] : [w.classifier]),
  ];
  return Buffer.concat([header, ...arrays.map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength))]);
}
