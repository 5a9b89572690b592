// Runs the network natively, op by op: the forward pass shared by training and generation (attention is the
// only part that differs, passed in as a callback), and backward to the adapters. Backward reads each block's
// intermediates as the forward left them when they fit (Checkpointing 'auto'/'off'); otherwise it keeps only
// each block's input and recomputes the block when it reaches it (activation checkpointing per block), so
// memory is O(layers·rows·dim) plus one block's intermediates.
//
// Every tensor lives in the backend's memory (memory.ts): host arrays on the cpu; on cuda and emu the weights
// are uploaded once, here, and activations, adapters and gradients stay on the device. The host sends token
// ids, positions and targets, and reads back logits or the loss (and, unless a device optimizer takes them, the
// gradients: LlamaModel.trainingOnBackend).
import { freemem } from 'node:os';
import { PROJECTIONS } from '../../dsl/resolved.ts';
import { denseTable } from './dense.ts';
import type { Adapter, AdapterSet, HalfTable, Linear, LlamaConfig, LlamaWeights, ProjectionName, TokenTable } from './types.ts';
import { specializationId, type CoreOps, type NativeOps, type SpecKernels } from './native-ops.ts';
import { QaloraError } from '../errors.ts';
import type { GradOptions } from './llama.ts';
import { LinearOp, type AdapterTensors, type LinearCall, type LinearWork } from './linear.ts';
import { deviceMemory, Grown, hostMemory, RowBuffers, type F32, type I32, type Memory, type U16, type U32 } from './memory.ts';
import type { BackendName } from './types.ts';
import { splitmix32 } from '../random.ts';
import type { OpProfile } from './profile.ts';

/**
 * What the GEMVs of inference (decode: a few rows) multiply q with: 'fp32' activations (exact, the default) or
 * 'int8' (CPU only: x quantized per 32 inputs, integer dot products, as llama.cpp decodes). Training always runs fp32.
 */
export type ActivationMode = 'fp32' | 'int8';

/**
 * Activation checkpointing in training: 'on' keeps only each block's input and recomputes the block in backward
 * (memory O(layers·rows·dim)); 'off' keeps every block's intermediates from the forward (no recompute, about 15×
 * that memory at LLaMA's shapes); 'auto' (default) keeps them when they fit keepBudget().
 */
export type Checkpointing = 'auto' | 'on' | 'off';
export const CHECKPOINTING: readonly Checkpointing[] = ['auto', 'on', 'off'];

export interface RunnerOptions {
  backend: BackendName;
  checkpointing?: Checkpointing;
  activations?: ActivationMode;
  /** Per-op timing (`train --profile`); without it the native ops are called directly. */
  profile?: OpProfile;
  /**
   * On cuda/emu: keep the model's tensors on the device (default true). false stages every call's host arrays
   * instead (GPTQ calibration, which reads each block's inputs on the host).
   */
  resident?: boolean;
}

/** Fills att [rows, dim] from roped q [rows, dim], k/v [rows, kvDim] of a block. */
export type Attend = (block: number, q: F32, k: F32, v: F32, att: F32, lse: F32) => void;

const NO_ADAPTER: LinearCall = { training: false, seed: 0 };

/**
 * The most bytes 'auto' checkpointing keeps of a step's activations: half the host's available memory, at most
 * 8 GiB (a device's free memory is not asked: 4 GiB there), so a step that fits runs without the recompute.
 */
function keepBudget(mem: Memory): number {
  const GiB = 2 ** 30;
  return mem.device ? 4 * GiB : Math.min(8 * GiB, freemem() / 2);
}

/** A token table as the linear layer [vocab, dim] the classifier runs. */
function tableLinear(t: TokenTable, vocab: number, dim: number): Linear | HalfTable {
  return t instanceof Float32Array ? { kind: 'float', out: vocab, in: dim, w: t } : t;
}

/** Logits rows computed per classifier call, so [rows, vocab] never has to exist whole. */
const CLASSIFIER_CHUNK_FLOATS = 1 << 24;

/** Per row of one block's forward: what backward reads (SavedField), and two outputs it does not ('o', 'd'). */
type BlockField = SavedField | 'o' | 'd';
type SavedField = 'xn' | 'rstd1' | 'q' | 'k' | 'v' | 'att' | 'lse' | 'xmid' | 'xn2' | 'rstd2' | 'g' | 'u' | 'h';
/** Where one block's forward writes: the shared buffers, or (no checkpointing) the block's own saved ones. */
type BlockStore = { rows(m: number): Record<BlockField, F32> };
/** Per row of backward through one block. */
type GradField = 'dh' | 'dg' | 'du' | 'dxn' | 'datt' | 'dq' | 'dk' | 'dv' | 'tmp';
/** Per row of the residual stream around the blocks. */
type StreamField = 'x' | 'xf' | 'rstdf' | 'dxf' | 'dx' | 'xw';

/** The token table as the embedding reads it: fp32 rows, or a quantized table whose looked-up rows are dequantized. */
type EmbeddingTable = { kind: 'float'; table: F32 } | { kind: 'half'; table: U16; bf16: boolean } | { kind: 'quant'; kernels: SpecKernels; qweight: U32; alpha: F32 | U16; beta: F32 | U16; wordsPerRow: number; groups: number };

export class Runner {
  readonly config: LlamaConfig;
  readonly core: CoreOps;
  /** Where the model's tensors live: host arrays, or the device of a GPU backend. */
  readonly mem: Memory;
  readonly headDim: number;
  readonly kvDim: number;
  /** One block's forward intermediates, by name; valid until the next block runs. */
  readonly block: RowBuffers<BlockField>;
  private readonly grad: RowBuffers<GradField>;
  private readonly stream: RowBuffers<StreamField>;
  private readonly linears: Array<Record<ProjectionName, LinearOp>>;
  /** logits = xf·classifierᵀ: the core GEMM on an fp32 table, the QA-LoRA kernels (rank 0) on a quantized one. */
  private readonly classifier: LinearOp;
  private readonly embedding: EmbeddingTable;
  private readonly norms: Array<{ attn: F32; ffn: F32 }>;
  private readonly finalNormW: F32;
  private readonly adapterTensors: AdapterMirror;
  /** Where host ids go on a device: one buffer per use, so a step's uploads do not overwrite each other. */
  private readonly ints: Record<'tokens' | 'pos' | 'targets', Grown<I32>>;
  private readonly logitsChunk: Grown<F32>;
  private readonly inputs: Grown<F32>;
  private grads?: GradBuffers;
  /** forwardBlock as backward's per-block recompute calls it (timed as one row when profiling). */
  private readonly recompute: Runner['forwardBlock'];
  private readonly savedWidths: Record<SavedField, number>;
  /** Per block, the forward's intermediates kept for backward (training without checkpointing). */
  private saved?: BlockStore[];

  constructor(readonly weights: LlamaWeights, readonly native: NativeOps, readonly opts: RunnerOptions) {
    const prof = opts.profile;
    this.config = weights.config;
    this.mem = native.device && opts.resident !== false ? deviceMemory(native.device) : hostMemory;
    const mem = this.mem;
    this.core = prof ? prof.wrapCore(native.core) : native.core;
    const { dim, hidden, heads, vocab } = this.config;
    this.headDim = dim / heads;
    this.kvDim = this.config.kvHeads * this.headDim;
    const kv = this.kvDim;
    this.savedWidths = { xn: dim, rstd1: 1, q: dim, k: kv, v: kv, att: dim, lse: heads, xmid: dim, xn2: dim, rstd2: 1, g: hidden, u: hidden, h: hidden };
    this.block = new RowBuffers(mem, { ...this.savedWidths, o: dim, d: dim });
    this.grad = new RowBuffers(mem, { dh: hidden, dg: hidden, du: hidden, dxn: dim, datt: dim, dq: dim, dk: kv, dv: kv, tmp: dim });
    this.stream = new RowBuffers(mem, { x: dim, xf: dim, rstdf: 1, dxf: dim, dx: dim, xw: dim });
    this.ints = { tokens: this.grownI32(), pos: this.grownI32(), targets: this.grownI32() };
    this.logitsChunk = new Grown(mem, (n) => mem.f32(n));
    this.inputs = new Grown(mem, (n) => mem.f32(n));
    const work: LinearWork = LinearOp.work(mem);
    const linear = (lin: Linear | HalfTable, name: string, kind: string) => {
      const op = new LinearOp(lin, native, mem, work, name);
      prof?.timeLinear(op, kind);
      return op;
    };
    this.linears = weights.blocks.map((b, l) => {
      const ops = {} as Record<ProjectionName, LinearOp>;
      for (const p of PROJECTIONS) ops[p] = linear(b.proj[p], `layers.${l}.${p}`, p);
      return ops;
    });
    this.norms = weights.blocks.map((b) => ({ attn: mem.resident(b.attnNorm), ffn: mem.resident(b.ffnNorm) }));
    this.finalNormW = mem.resident(weights.finalNorm);
    // A GPU backend has no half GEMM: it holds a half table in fp32, widened once (and shared when tied).
    const widened = new Map<TokenTable, Float32Array>();
    const onBackend = (t: TokenTable): TokenTable => {
      if (!mem.device || t instanceof Float32Array || t.kind !== 'half') return t;
      if (!widened.has(t)) widened.set(t, denseTable(t));
      return widened.get(t)!;
    };
    this.classifier = linear(tableLinear(onBackend(weights.classifier), vocab, dim), 'classifier', 'classifier');
    this.embedding = this.embeddingTable(onBackend(weights.tokEmbedding));
    this.adapterTensors = new AdapterMirror(mem);
    this.recompute = prof ? prof.wrap('recompute', this.forwardBlock.bind(this)) : this.forwardBlock;
    if (prof) this.embed = prof.wrap('embedding', this.embed.bind(this));
  }

  private grownI32(): Grown<I32> {
    return new Grown<I32>(this.mem, (n) => this.mem.i32(n));
  }

  private embeddingTable(emb: TokenTable): EmbeddingTable {
    const mem = this.mem;
    if (emb instanceof Float32Array) return { kind: 'float', table: mem.resident(emb) };
    if (emb.kind === 'half') return { kind: 'half', table: mem.resident(emb.data), bf16: emb.dtype === 'bf16' };
    const kernels = this.native.kernels[specializationId(emb.settings)];
    if (!kernels) throw new QaloraError(`tok_embeddings: no ${this.native.backend} kernels for ${specializationId(emb.settings)}`);
    const vocab = this.config.vocab;
    // mem.resident uploads an array once: a table tied to the classifier shares the classifier's copy.
    return { kind: 'quant', kernels, qweight: mem.resident(emb.qweight), alpha: mem.resident(emb.alpha), beta: mem.resident(emb.beta), wordsPerRow: emb.qweight.length / vocab, groups: emb.alpha.length / vocab };
  }

  /** Host ids in the backend's memory: the array itself on the host, an upload into `into` on a device. */
  toBackend(a: Int32Array, into: Grown<I32>): I32 {
    if (!this.mem.device) return a;
    const t = into.get(a.length);
    this.mem.write(t, a);
    return t;
  }

  /** The adapters' tensors on the backend: re-uploaded from the host arrays (the optimizer updates those). */
  syncAdapters(adapters: AdapterSet): void {
    this.adapterTensors.refresh(adapters);
  }

  /** A decode step's adapters: laid out on the backend if they are new, not re-uploaded. */
  ensureAdapters(adapters: AdapterSet): void {
    this.adapterTensors.ensure(adapters);
  }

  /**
   * Makes the backend's copy of the adapters their authority (training on the device) and returns it: one flat
   * tensor in paramList order. Host arrays are stale until pullAdapters(); hostAuthority() hands back.
   */
  deviceAdapters(adapters: AdapterSet): F32 {
    const params = this.adapterTensors.params(adapters);
    this.adapterTensors.authority = 'device';
    return params;
  }

  pullAdapters(): void {
    this.adapterTensors.pull();
  }

  hostAuthority(): void {
    this.adapterTensors.authority = 'host';
  }

  // ---- forward ---------------------------------------------------------------------------------------------

  /** x [n, dim] = the rows of `tokens` (host ids, validated by the caller; `ids` the same on the backend). */
  embed(tokens: Int32Array, ids: I32, x: F32): void {
    const { vocab, dim } = this.config;
    const e = this.embedding, mem = this.mem;
    if (e.kind === 'float') {
      this.core.embedding_forward(e.table, ids, x, tokens.length, vocab, dim);
      return;
    }
    if (e.kind === 'half') {
      this.core.embedding_forward_half(e.table, ids, x, tokens.length, vocab, dim, e.bf16);
      return;
    }
    // A quantized table: dequantize only the rows looked up.
    const wpr = e.wordsPerRow, groups = e.groups;
    for (let i = 0; i < tokens.length; i++) {
      const r = tokens[i];
      e.kernels.dequantize(mem.view(e.qweight, r * wpr, wpr), mem.view(e.alpha, r * groups, groups), mem.view(e.beta, r * groups, groups), 1, dim, mem.view(x, i * dim, dim));
    }
  }

  private call(adapters: AdapterSet, l: number, p: ProjectionName, training: boolean, seed: number): LinearCall {
    return { adapter: this.adapterTensors.of(adapters[l]?.[p]), training, seed: training ? layerSeed(seed, l, p) : 0, int8: !training && this.opts.activations === 'int8' };
  }

  /**
   * Block l on x [m, dim] in place (x ← x + attn(x); x ← x + ffn(x)); pos [m] are the rows' positions.
   * Intermediates stay in `store` (the shared this.block unless given) until the next block writes there.
   */
  forwardBlock(l: number, x: F32, m: number, pos: I32, adapters: AdapterSet, attend: Attend, training = false, seed = 0, store: BlockStore = this.block): void {
    const { dim, hidden, heads, kvHeads, normEps, ropeTheta } = this.config;
    const c = this.core, b = store.rows(m), norm = this.norms[l], lin = this.linears[l];
    const call = (p: ProjectionName) => this.call(adapters, l, p, training, seed);
    c.rmsnorm_forward(x, norm.attn, b.xn, b.rstd1, m, dim, normEps);
    lin.q.forward(b.xn, b.q, m, call('q'));
    lin.k.forward(b.xn, b.k, m, call('k'));
    lin.v.forward(b.xn, b.v, m, call('v'));
    c.rope_forward(b.q, pos, m, heads, this.headDim, ropeTheta, false);
    c.rope_forward(b.k, pos, m, kvHeads, this.headDim, ropeTheta, false);
    attend(l, b.q, b.k, b.v, b.att, b.lse);
    lin.o.forward(b.att, b.o, m, call('o'));
    this.mem.copy(b.xmid, x);
    c.add_inplace(b.xmid, b.o, m * dim);
    c.rmsnorm_forward(b.xmid, norm.ffn, b.xn2, b.rstd2, m, dim, normEps);
    lin.gate.forward(b.xn2, b.g, m, call('gate'));
    lin.up.forward(b.xn2, b.u, m, call('up'));
    c.swiglu_forward(b.g, b.u, b.h, m * hidden);
    lin.down.forward(b.h, b.d, m, call('down'));
    this.mem.copy(x, b.xmid);
    c.add_inplace(x, b.d, m * dim);
  }

  /** Final norm of x [m, dim] into xf (rstd kept for backward). */
  finalNorm(x: F32, m: number): { xf: F32; rstd: F32 } {
    const { dim, normEps } = this.config;
    const s = this.stream.rows(m);
    this.core.rmsnorm_forward(x, this.finalNormW, s.xf, s.rstdf, m, dim, normEps);
    return { xf: s.xf, rstd: s.rstdf };
  }

  /** logits [m, vocab] = xf·classifierᵀ. */
  classify(xf: F32, m: number, out: F32, training = false): void {
    this.classifier.forward(xf, out, m, training ? NO_ADAPTER : { ...NO_ADAPTER, int8: this.opts.activations === 'int8' });
  }

  private trainingAttend(batch: number, seqLen: number): Attend {
    const { heads, kvHeads } = this.config;
    return (_l, q, k, v, att, lse) => this.core.attention_forward(q, k, v, att, lse, batch, seqLen, seqLen, heads, kvHeads, this.headDim);
  }

  private positions(batch: number, seqLen: number): I32 {
    const pos = new Int32Array(batch * seqLen);
    for (let b = 0; b < batch; b++) for (let t = 0; t < seqLen; t++) pos[b * seqLen + t] = t;
    return this.toBackend(pos, this.ints.pos);
  }

  /**
   * Residual stream after all blocks, for [batch, seqLen] tokens; with `keep`, each block's input is kept (and,
   * given stores, its intermediates). Returns the positions too (backward's recompute uses them).
   */
  private trunk(adapters: AdapterSet, tokens: Int32Array, batch: number, seqLen: number, training: boolean, seed: number, keep?: { inputs: F32; stores?: BlockStore[] }): { x: F32; pos: I32 } {
    const m = batch * seqLen, dim = this.config.dim;
    const x = this.stream.rows(m).x;
    this.embed(tokens, this.toBackend(tokens, this.ints.tokens), x);
    const pos = this.positions(batch, seqLen), attend = this.trainingAttend(batch, seqLen);
    for (let l = 0; l < this.config.layers; l++) {
      if (keep) this.mem.copy(keep.inputs, x, l * m * dim);
      this.forwardBlock(l, x, m, pos, adapters, attend, training, seed, keep?.stores?.[l]);
    }
    return { x, pos };
  }

  logits(adapters: AdapterSet, tokens: Int32Array, batch: number, seqLen: number): Float32Array {
    const m = batch * seqLen;
    this.syncAdapters(adapters);
    const { x } = this.trunk(adapters, tokens, batch, seqLen, false, 0);
    const { xf } = this.finalNorm(x, m);
    const out = new Float32Array(m * this.config.vocab);
    const logits = this.mem.device ? this.logitsChunk.get(out.length) : out;
    this.classify(xf, m, logits);
    return this.mem.read(logits, out);
  }

  loss(adapters: AdapterSet, tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, mask?: Uint8Array): { loss: number; count: number } {
    const m = batch * seqLen;
    this.syncAdapters(adapters);
    const { x } = this.trunk(adapters, tokens, batch, seqLen, false, 0);
    const { xf } = this.finalNorm(x, m);
    const t = maskedTargets(targets, mask);
    return { loss: this.classifierLoss(xf, this.toBackend(t, this.ints.targets), m), count: countScored(t) };
  }

  /** Σ CE over rows, chunked; with dxf, also writes d(loss)/d(xf). */
  private classifierLoss(xf: F32, targets: I32, m: number, dxf?: F32): number {
    const { dim, vocab } = this.config;
    const mem = this.mem;
    const rows = Math.max(1, Math.min(m, Math.floor(CLASSIFIER_CHUNK_FLOATS / vocab)));
    let total = 0;
    for (let r0 = 0; r0 < m; r0 += rows) {
      const n = Math.min(rows, m - r0);
      const logits = this.logitsChunk.get(n * vocab);
      const xs = mem.view(xf, r0 * dim, n * dim), ts = mem.view(targets, r0, n);
      this.classify(xs, n, logits, dxf !== undefined);
      if (!dxf) {
        total += this.core.cross_entropy_forward(logits, ts, n, vocab);
        continue;
      }
      total += this.core.cross_entropy_backward(logits, ts, n, vocab, 1, logits);
      this.classifier.backward(xs, logits, mem.view(dxf, r0 * dim, n * dim), n, NO_ADAPTER, false);
    }
    return total;
  }

  // ---- backward --------------------------------------------------------------------------------------------

  /**
   * Loss and gradients; `flat` holds every gradient in paramList order on the backend (overwritten by the next
   * call). With opts.gradsOnBackend the host's `grads` are not filled (a device optimizer reads `flat`).
   */
  lossAndGrad(adapters: AdapterSet, tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts: GradOptions & { gradsOnBackend?: boolean }): { loss: number; count: number; grads: AdapterSet; flat: F32 } {
    const { dim, hidden, heads, kvHeads, layers } = this.config;
    const m = batch * seqLen, training = opts.training ?? false, seed = opts.seed ?? 0;
    const c = this.core, mem = this.mem;
    this.syncAdapters(adapters);
    const inputs = this.inputs.get(layers * m * dim);
    const input = (l: number) => mem.view(inputs, l * m * dim, m * dim);
    const stores = this.savedStores(m);
    const { x, pos } = this.trunk(adapters, tokens, batch, seqLen, training, seed, { inputs, stores });
    const { xf, rstd } = this.finalNorm(x, m);
    const t = maskedTargets(targets, opts.mask);
    const s = this.stream.rows(m);
    const loss = this.classifierLoss(xf, this.toBackend(t, this.ints.targets), m, s.dxf);
    const dx = s.dx;
    c.rmsnorm_backward(x, this.finalNormW, rstd, s.dxf, dx, m, dim);

    const grads = this.gradBuffers(adapters);
    if (grads.host.every((set) => Object.keys(set).length === 0)) return { loss, count: countScored(t), grads: grads.host, flat: grads.flat }; // nothing to train
    const attend = this.trainingAttend(batch, seqLen);
    const xw = s.xw, d = this.grad.rows(m);
    for (let l = layers - 1; l >= 0; l--) {
      if (!stores) {
        mem.copy(xw, input(l));
        this.recompute(l, xw, m, pos, adapters, attend, training, seed);
      }
      const b = (stores?.[l] ?? this.block).rows(m), norm = this.norms[l], lin = this.linears[l];
      const call = (p: ProjectionName) => this.call(adapters, l, p, training, seed);
      const grad = (p: ProjectionName) => grads.onBackend[l]?.[p];
      // FFN: out = xmid + down(swiglu(gate(xn2), up(xn2)))
      lin.down.backward(b.h, dx, d.dh, m, call('down'), false, grad('down'));
      c.swiglu_backward(b.g, b.u, d.dh, d.dg, d.du, m * hidden);
      lin.gate.backward(b.xn2, d.dg, d.dxn, m, call('gate'), false, grad('gate'));
      lin.up.backward(b.xn2, d.du, d.dxn, m, call('up'), true, grad('up'));
      c.rmsnorm_backward(b.xmid, norm.ffn, b.rstd2, d.dxn, d.tmp, m, dim);
      c.add_inplace(dx, d.tmp, m * dim);
      // Attention: xmid = x + o(attn(rope(q(xn)), rope(k(xn)), v(xn)))
      lin.o.backward(b.att, dx, d.datt, m, call('o'), false, grad('o'));
      c.attention_backward(b.q, b.k, b.v, b.att, b.lse, d.datt, d.dq, d.dk, d.dv, batch, seqLen, seqLen, heads, kvHeads, this.headDim);
      c.rope_backward(d.dq, pos, m, heads, this.headDim, this.config.ropeTheta, false);
      c.rope_backward(d.dk, pos, m, kvHeads, this.headDim, this.config.ropeTheta, false);
      lin.q.backward(b.xn, d.dq, d.dxn, m, call('q'), false, grad('q'));
      lin.k.backward(b.xn, d.dk, d.dxn, m, call('k'), true, grad('k'));
      lin.v.backward(b.xn, d.dv, d.dxn, m, call('v'), true, grad('v'));
      if (l === 0) break; // the embeddings are frozen: nothing below block 0 needs dx
      c.rmsnorm_backward(input(l), norm.attn, b.rstd1, d.dxn, d.tmp, m, dim);
      c.add_inplace(dx, d.tmp, m * dim);
    }
    if (mem.device && !opts.gradsOnBackend) mem.read(grads.flat, grads.hostFlat); // every gradient in one download
    return { loss, count: countScored(t), grads: grads.host, flat: grads.flat };
  }

  /**
   * One store per block for a forward of m rows whose intermediates backward reads without recomputing them,
   * or undefined when checkpointing is on (or, on 'auto', when they would not fit KEEP_BUDGET).
   */
  private savedStores(m: number): BlockStore[] | undefined {
    const mode = this.opts.checkpointing ?? 'auto';
    const perRow = Object.values<number>(this.savedWidths).reduce((a, w) => a + w, 0);
    if (mode === 'on' || (mode === 'auto' && this.config.layers * m * perRow * 4 > keepBudget(this.mem))) {
      this.saved = undefined; // a larger batch than before: let the host collect what the smaller one kept
      return undefined;
    }
    this.saved ??= this.weights.blocks.map(() => {
      const own = new RowBuffers(this.mem, this.savedWidths);
      return { rows: (n: number) => ({ ...this.block.rows(n), ...own.rows(n) }) };
    });
    return this.saved;
  }

  /** Gradient buffers shaped like the adapters (reused while the shapes stay the same): one flat block each side. */
  private gradBuffers(adapters: AdapterSet): GradBuffers {
    const shape = adapters.map((blk) => PROJECTIONS.map((p) => (blk?.[p] && blk[p]!.rank > 0 ? `${blk[p]!.a.length}/${blk[p]!.b.length}` : '-')).join(',')).join(';');
    if (this.grads?.shape === shape) return this.grads;
    let total = 0;
    for (const blk of adapters) for (const p of PROJECTIONS) if (blk?.[p] && blk[p]!.rank > 0) total += blk[p]!.a.length + blk[p]!.b.length;
    const hostFlat = new Float32Array(total);
    const flat = this.mem.device ? this.mem.f32(total) : hostFlat;
    let at = 0;
    const host: AdapterSet = [], onBackend: GradBuffers['onBackend'] = [];
    for (const blk of adapters) {
      const h: AdapterSet[number] = {}, d: GradBuffers['onBackend'][number] = {};
      for (const p of PROJECTIONS) {
        const ad = blk?.[p];
        if (!ad || ad.rank <= 0) continue;
        const [na, nb] = [ad.a.length, ad.b.length];
        h[p] = { rank: ad.rank, alpha: ad.alpha, a: hostFlat.subarray(at, at + na), b: hostFlat.subarray(at + na, at + na + nb) };
        d[p] = { a: this.mem.view(flat, at, na), b: this.mem.view(flat, at + na, nb) };
        at += na + nb;
      }
      host.push(h);
      onBackend.push(d);
    }
    this.grads = { shape, host, onBackend, flat, hostFlat };
    return this.grads;
  }
}

interface GradBuffers {
  shape: string;
  /** What lossAndGrad returns: views of hostFlat shaped like the adapters. */
  host: AdapterSet;
  /** What the kernels write: views of flat (hostFlat itself on the cpu). */
  onBackend: Array<Partial<Record<ProjectionName, { a: F32; b: F32 }>>>;
  flat: F32;
  hostFlat: Float32Array;
}

/**
 * The adapters as the kernels take them. On the host that is the adapter itself. On a device, one flat tensor
 * holds every adapter's A then B in paramList order (runtime/train/params.ts), so an optimizer on the device
 * updates them all in one call. While the host is their authority (inference, the host optimizer) refresh()
 * uploads them at each pass over the model, in one copy; while the device is (training there) nothing is
 * uploaded and pull() brings them back to the host arrays (checkpoints, the end of training).
 */
class AdapterMirror {
  authority: 'host' | 'device' = 'host';
  private layout?: { adapters: Adapter[]; tensors: Map<Adapter, AdapterTensors>; params: F32; host: Float32Array };

  constructor(private readonly mem: Memory) {}

  of(ad: Adapter | undefined): AdapterTensors | undefined {
    if (!ad || !this.mem.device || ad.rank <= 0) return ad;
    const t = this.layout?.tensors.get(ad);
    if (!t) throw new Error('internal: an adapter reached the kernels before Runner.ensureAdapters saw it');
    return t;
  }

  /** Lays the set out on the device (uploading it) unless its adapters are the ones laid out already. */
  ensure(set: AdapterSet): void {
    if (!this.mem.device) return;
    const list = trainable(set);
    const same = this.layout && this.layout.adapters.length === list.length && list.every((ad, i) => ad === this.layout!.adapters[i]);
    if (same) return;
    const total = list.reduce((n, ad) => n + ad.a.length + ad.b.length, 0);
    const params = this.mem.f32(total), tensors = new Map<Adapter, AdapterTensors>();
    let at = 0;
    for (const ad of list) {
      tensors.set(ad, { rank: ad.rank, alpha: ad.alpha, a: this.mem.view(params, at, ad.a.length), b: this.mem.view(params, at + ad.a.length, ad.b.length) });
      at += ad.a.length + ad.b.length;
    }
    if (this.layout) this.mem.free(this.layout.params);
    this.layout = { adapters: list, tensors, params, host: new Float32Array(total) };
    this.upload();
  }

  /** The host arrays' current values to the device (one copy), unless the device is their authority. */
  refresh(set: AdapterSet): void {
    if (!this.mem.device) return;
    const had = this.layout;
    this.ensure(set);
    if (had === this.layout && this.authority === 'host') this.upload();
  }

  /** The flat parameter tensor (paramList order), laid out for `set`. */
  params(set: AdapterSet): F32 {
    this.ensure(set);
    return this.layout!.params;
  }

  /** The device's values into the host arrays (one copy). */
  pull(): void {
    const l = this.layout;
    if (!this.mem.device || !l) return;
    this.mem.read(l.params, l.host);
    let at = 0;
    for (const ad of l.adapters) {
      ad.a.set(l.host.subarray(at, at + ad.a.length));
      ad.b.set(l.host.subarray(at + ad.a.length, at + ad.a.length + ad.b.length));
      at += ad.a.length + ad.b.length;
    }
  }

  private upload(): void {
    const l = this.layout!;
    let at = 0;
    for (const ad of l.adapters) {
      l.host.set(ad.a, at);
      l.host.set(ad.b, at + ad.a.length);
      at += ad.a.length + ad.b.length;
    }
    this.mem.write(l.params, l.host);
  }
}

/** The adapters with rank > 0, in paramList order (block, projection). */
function trainable(set: AdapterSet): Adapter[] {
  const out: Adapter[] = [];
  for (const blk of set) for (const p of PROJECTIONS) if (blk?.[p] && blk[p]!.rank > 0) out.push(blk[p]!);
  return out;
}

function maskedTargets(targets: Int32Array, mask?: Uint8Array): Int32Array {
  if (!mask) return targets;
  const t = new Int32Array(targets.length);
  for (let i = 0; i < t.length; i++) t[i] = mask[i] ? targets[i] : -1;
  return t;
}

function countScored(targets: Int32Array): number {
  let n = 0;
  for (let i = 0; i < targets.length; i++) if (targets[i] >= 0) n++;
  return n;
}

/** A distinct dropout stream per (step seed, block, projection), the same in the forward and its recompute. */
function layerSeed(seed: number, block: number, p: ProjectionName): number {
  return splitmix32((seed >>> 0) ^ splitmix32(block * 8 + PROJECTIONS.indexOf(p) + 1));
}
