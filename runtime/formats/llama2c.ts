// llama2.c checkpoints. v0 (legacy): 7 × i32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size
// (negative: separate classifier), seq_len}, then f32 tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
// rms_final, the legacy RoPE table (skipped), wcls when unshared. v1: u32 magic "ak42", i32 version 1, the same
// 7 i32, u8 shared_classifier, padded to 256 bytes; then norms first (rms_att, rms_ffn, rms_final), tok_emb,
// wq … w3, wcls when unshared. w1 = gate, w2 = down, w3 = up; matrices [out, in] row-major, q/k in Meta layout.
import { QaloraError } from '../errors.ts';
import type { BlockWeights, FileLinear, LlamaConfig, LlamaWeights, LoadedLinear } from '../model/types.ts';
import { denseTable } from '../model/dense.ts';
import { BufferSource, type ByteSource, checkRange, withFile } from './file.ts';

export const LLAMA2C_MAGIC = 0x616b3432;

/** Opens a llama2.c checkpoint: header, norms and embedding read now, projections when the model is prepared. */
export function readLlama2c(path: string): LlamaWeights<LoadedLinear> {
  return withFile(path, 'llama2.c checkpoint', (src) => parseSource(src));
}

/** A llama2.c checkpoint in memory. */
export function parseLlama2c(buf: Uint8Array, path: string): LlamaWeights<LoadedLinear> {
  return parseSource(new BufferSource(buf, path));
}

/** Lays out the f32 runs in file order (each checked against the file size now) and reads them when asked. */
class F32Layout {
  constructor(private readonly src: ByteSource, private offset: number) {}
  /** The next run of n floats: its reader, validated now (before any later read could touch it). */
  next(n: number, what: string, shape: number[]): () => Float32Array {
    const at = this.offset, where = `${this.src.path}: tensor ${what}: F32 [${shape}]`;
    this.skip(n, where);
    return () => this.src.array(Float32Array, at, n, where);
  }
  take(n: number, what: string, shape = [n]): Float32Array {
    return this.next(n, what, shape)();
  }
  skip(n: number, where: string): void {
    checkRange(this.src.size, this.offset, n * 4, where);
    this.offset += n * 4;
  }
  get position(): number {
    return this.offset;
  }
}

function parseSource(src: ByteSource): LlamaWeights<LoadedLinear> {
  const path = src.path;
  if (src.size < 28) throw new QaloraError(`${path}: too short for a llama2.c checkpoint (${src.size} bytes; the header alone is 28)`);
  const head = Buffer.from(src.bytes(0, Math.min(256, src.size), `${path}: header`));
  const v1 = head.readUInt32LE(0) === LLAMA2C_MAGIC;
  let headerBytes = 28;
  let shared: boolean;
  let h: number[];
  if (v1) {
    const version = head.readInt32LE(4);
    if (version !== 1) {
      throw new QaloraError(`${path}: llama2.c checkpoint version ${version} is not supported (only v0 legacy and v1 float32; v2 is llama2.c's Q8_0 export)`);
    }
    if (src.size < 256) throw new QaloraError(`${path}: truncated llama2.c v1 header (${src.size} of 256 bytes)`);
    h = Array.from({ length: 7 }, (_, i) => head.readInt32LE(8 + 4 * i));
    shared = head[36] !== 0;
    headerBytes = 256;
  } else {
    h = Array.from({ length: 7 }, (_, i) => head.readInt32LE(4 * i));
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

  const c = new F32Layout(src, headerBytes);
  const perLayer = (n: number, what: string) => Array.from({ length: layers }, (_, l) => c.take(n, `${what}[${l}]`));
  const lin = (out: number, inp: number, what: string) =>
    Array.from({ length: layers }, (_, l): FileLinear => ({
      kind: 'file', out, in: inp, fileType: 'F32', source: `${path}: tensor ${what}[${l}]`,
      readFloat: c.next(out * inp, `${what}[${l}]`, [out, inp]),
    }));

  let tokEmbedding: Float32Array;
  let attnNorm: Float32Array[], ffnNorm: Float32Array[], finalNorm: Float32Array;
  if (v1) {
    attnNorm = perLayer(dim, 'rms_att');
    ffnNorm = perLayer(dim, 'rms_ffn');
    finalNorm = c.take(dim, 'rms_final');
    tokEmbedding = c.take(vocab * dim, 'tok_embeddings', [vocab, dim]);
  } else {
    tokEmbedding = c.take(vocab * dim, 'tok_embeddings', [vocab, dim]);
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
    c.skip(context * headSize, `${path}: freq_cis (legacy RoPE table)`);
  }
  const classifier = shared ? tokEmbedding : c.take(vocab * dim, 'wcls', [vocab, dim]);
  if (c.position !== src.size) {
    throw new QaloraError(`${path}: ${src.size - c.position} bytes left after the last tensor: the header (${JSON.stringify(config)}) does not describe this file`);
  }
  const blocks: BlockWeights<LoadedLinear>[] = Array.from({ length: layers }, (_, l) => ({
    attnNorm: attnNorm[l],
    ffnNorm: ffnNorm[l],
    proj: { q: wq[l], k: wk[l], v: wv[l], o: wo[l], gate: w1[l], down: w2[l], up: w3[l] },
  }));
  return { config, tokEmbedding, blocks, finalNorm, classifier };
}

/** Serialises weights as a llama2.c v1 ("ak42") file; float projections only. */
export function serializeLlama2cV1(w: LlamaWeights<LoadedLinear>): Buffer {
  const { dim, hidden, layers, heads, kvHeads, vocab, context, tiedClassifier } = w.config;
  const header = Buffer.alloc(256);
  header.writeUInt32LE(LLAMA2C_MAGIC, 0);
  header.writeInt32LE(1, 4);
  [dim, hidden, layers, heads, kvHeads, vocab, context].forEach((v, i) => header.writeInt32LE(v, 8 + 4 * i));
  header[36] = tiedClassifier ? 1 : 0;
  const mat = (p: 'q' | 'k' | 'v' | 'o' | 'gate' | 'down' | 'up') =>
    w.blocks.map((b, l) => {
      const lin = b.proj[p];
      if (lin.kind === 'quant') throw new QaloraError(`llama2.c export: block ${l} projection ${p} is quantized; llama2.c v1 holds float weights only`);
      return lin.kind === 'file' ? lin.readFloat() : lin.w;
    });
  const arrays: Float32Array[] = [
    ...w.blocks.map((b) => b.attnNorm), ...w.blocks.map((b) => b.ffnNorm), w.finalNorm, denseTable(w.tokEmbedding),
    ...mat('q'), ...mat('k'), ...mat('v'), ...mat('o'), ...mat('gate'), ...mat('down'), ...mat('up'),
    ...(tiedClassifier ? [] : [denseTable(w.classifier)]),
  ];
  return Buffer.concat([header, ...arrays.map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength))]);
}
