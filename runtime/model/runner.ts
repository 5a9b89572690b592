// Runs the network natively, op by op: the forward pass shared by training and generation (attention is the
// only part that differs, passed in as a callback), and backward to the adapters. Backward keeps only each
// block's input and recomputes the block's activations when it reaches it (activation checkpointing per
// block), so memory is O(layers·rows·dim) plus one block's intermediates.
import { PROJECTIONS } from '../../dsl/resolved.ts';
import type { AdapterSet, Linear, LlamaConfig, LlamaWeights, ProjectionName, TokenTable } from './types.ts';
import { specializationId, type CoreOps, type NativeOps, type SpecKernels } from './native-ops.ts';
import { QaloraError } from '../errors.ts';
import type { GradOptions } from './llama.ts';
import { LinearOp, type LinearCall } from './linear.ts';
import { Scratch } from './scratch.ts';
import type { BackendName } from './types.ts';
import { splitmix32 } from '../random.ts';
import type { OpProfile } from './profile.ts';

/**
 * What the GEMVs of inference (decode: a few rows) multiply q with: 'fp32' activations (exact, the default) or
 * 'int8' (CPU only: x quantized per 32 inputs, integer dot products, as llama.cpp decodes). Training always runs fp32.
 */
export type ActivationMode = 'fp32' | 'int8';

export interface RunnerOptions {
  backend: BackendName;
  activations?: ActivationMode;
  /** Per-op timing (`train --profile`); without it the native ops are called directly. */
  profile?: OpProfile;
}

/** Fills att [rows, dim] from roped q [rows, dim], k/v [rows, kvDim] of a block. */
export type Attend = (block: number, q: Float32Array, k: Float32Array, v: Float32Array, att: Float32Array, lse: Float32Array) => void;

const NO_ADAPTER: LinearCall = { training: false, seed: 0 };

/** A token table as the linear layer [vocab, dim] the classifier runs. */
function tableLinear(t: TokenTable, vocab: number, dim: number): Linear {
  return t instanceof Float32Array ? { kind: 'float', out: vocab, in: dim, w: t } : t;
}

/** Logits rows computed per classifier call, so [rows, vocab] never has to exist whole. */
const CLASSIFIER_CHUNK_FLOATS = 1 << 24;

export class Runner {
  readonly config: LlamaConfig;
  readonly core: CoreOps;
  readonly scratch = new Scratch();
  readonly headDim: number;
  readonly kvDim: number;
  private readonly linears: Array<Record<ProjectionName, LinearOp>>;
  /** logits = xf·classifierᵀ: the core GEMM on an fp32 table, the QA-LoRA kernels (rank 0) on a quantized one. */
  private readonly classifier: LinearOp;
  /** The kernels that dequantize rows of a quantized embedding table; undefined for an fp32 table. */
  private readonly embeddingRows?: SpecKernels;
  private grads?: AdapterSet;
  /** forwardBlock as backward's per-block recompute calls it (timed as one row when profiling). */
  private readonly recompute: Runner['forwardBlock'];

  constructor(readonly weights: LlamaWeights, readonly native: NativeOps, readonly opts: RunnerOptions) {
    const prof = opts.profile;
    this.config = weights.config;
    this.core = prof ? prof.wrapCore(native.core) : native.core;
    this.headDim = this.config.dim / this.config.heads;
    this.kvDim = this.config.kvHeads * this.headDim;
    const linear = (lin: Linear, name: string, kind: string) => {
      const op = new LinearOp(lin, native, this.scratch, name);
      prof?.timeLinear(op, kind);
      return op;
    };
    this.linears = weights.blocks.map((b, l) => {
      const ops = {} as Record<ProjectionName, LinearOp>;
      for (const p of PROJECTIONS) ops[p] = linear(b.proj[p], `layers.${l}.${p}`, p);
      return ops;
    });
    const { vocab, dim } = this.config;
    this.classifier = linear(tableLinear(weights.classifier, vocab, dim), 'classifier', 'classifier');
    this.recompute = prof ? prof.wrap('recompute', this.forwardBlock.bind(this)) : this.forwardBlock;
    if (prof) this.embed = prof.wrap('embedding', this.embed.bind(this));
    const emb = weights.tokEmbedding;
    if (!(emb instanceof Float32Array)) {
      this.embeddingRows = native.kernels[specializationId(emb.settings)];
      if (!this.embeddingRows) throw new QaloraError(`tok_embeddings: no ${native.backend} kernels for ${specializationId(emb.settings)}`);
    }
  }

  // ---- forward ---------------------------------------------------------------------------------------------

  embed(tokens: Int32Array, x: Float32Array): void {
    const { vocab, dim } = this.config;
    const emb = this.weights.tokEmbedding;
    if (emb instanceof Float32Array) {
      this.core.embedding_forward(emb, tokens, x, tokens.length, vocab, dim);
      return;
    }
    // A quantized table: dequantize only the rows looked up (ids were validated by the caller).
    const wpr = emb.qweight.length / vocab, groups = emb.alpha.length / vocab;
    for (let i = 0; i < tokens.length; i++) {
      const r = tokens[i];
      this.embeddingRows!.dequantize(emb.qweight.subarray(r * wpr, (r + 1) * wpr), emb.alpha.subarray(r * groups, (r + 1) * groups),
        emb.beta.subarray(r * groups, (r + 1) * groups), 1, dim, x.subarray(i * dim, (i + 1) * dim));
    }
  }

  private call(adapters: AdapterSet, l: number, p: ProjectionName, training: boolean, seed: number): LinearCall {
    return { adapter: adapters[l]?.[p], training, seed: training ? layerSeed(seed, l, p) : 0, int8: !training && this.opts.activations === 'int8' };
  }

  /**
   * Block l on x [m, dim] in place (x ← x + attn(x); x ← x + ffn(x)); pos [m] are the rows' positions.
   * Intermediates stay in the scratch buffers named below until the next block runs (backward reads them).
   */
  forwardBlock(l: number, x: Float32Array, m: number, pos: Int32Array, adapters: AdapterSet, attend: Attend, training = false, seed = 0): void {
    const { dim, hidden, heads, kvHeads, normEps, ropeTheta } = this.config;
    const c = this.core, s = this.scratch, blk = this.weights.blocks[l], lin = this.linears[l];
    const call = (p: ProjectionName) => this.call(adapters, l, p, training, seed);
    const xn = s.f('xn', m * dim), rstd1 = s.f('rstd1', m);
    c.rmsnorm_forward(x, blk.attnNorm, xn, rstd1, m, dim, normEps);
    const q = s.f('q', m * dim), k = s.f('k', m * this.kvDim), v = s.f('v', m * this.kvDim);
    lin.q.forward(xn, q, m, call('q'));
    lin.k.forward(xn, k, m, call('k'));
    lin.v.forward(xn, v, m, call('v'));
    c.rope_forward(q, pos, m, heads, this.headDim, ropeTheta, false);
    c.rope_forward(k, pos, m, kvHeads, this.headDim, ropeTheta, false);
    const att = s.f('att', m * dim), lse = s.f('lse', m * heads);
    attend(l, q, k, v, att, lse);
    const o = s.f('o', m * dim);
    lin.o.forward(att, o, m, call('o'));
    const xmid = s.f('xmid', m * dim);
    xmid.set(x);
    c.add_inplace(xmid, o, m * dim);
    const xn2 = s.f('xn2', m * dim), rstd2 = s.f('rstd2', m);
    c.rmsnorm_forward(xmid, blk.ffnNorm, xn2, rstd2, m, dim, normEps);
    const g = s.f('g', m * hidden), u = s.f('u', m * hidden), h = s.f('h', m * hidden);
    lin.gate.forward(xn2, g, m, call('gate'));
    lin.up.forward(xn2, u, m, call('up'));
    c.swiglu_forward(g, u, h, m * hidden);
    const d = s.f('d', m * dim);
    lin.down.forward(h, d, m, call('down'));
    x.set(xmid);
    c.add_inplace(x, d, m * dim);
  }

  /** Final norm of x [m, dim] into xf (rstd kept for backward). */
  finalNorm(x: Float32Array, m: number): { xf: Float32Array; rstd: Float32Array } {
    const { dim, normEps } = this.config;
    const xf = this.scratch.f('xf', m * dim), rstd = this.scratch.f('rstdf', m);
    this.core.rmsnorm_forward(x, this.weights.finalNorm, xf, rstd, m, dim, normEps);
    return { xf, rstd };
  }

  /** logits [m, vocab] = xf·classifierᵀ. */
  classify(xf: Float32Array, m: number, out: Float32Array, training = false): void {
    this.classifier.forward(xf, out, m, training ? NO_ADAPTER : { ...NO_ADAPTER, int8: this.opts.activations === 'int8' });
  }

  private trainingAttend(batch: number, seqLen: number): Attend {
    const { heads, kvHeads } = this.config;
    return (_l, q, k, v, att, lse) => this.core.attention_forward(q, k, v, att, lse, batch, seqLen, seqLen, heads, kvHeads, this.headDim);
  }

  private positions(batch: number, seqLen: number): Int32Array {
    const pos = this.scratch.i('pos', batch * seqLen);
    for (let b = 0; b < batch; b++) for (let t = 0; t < seqLen; t++) pos[b * seqLen + t] = t;
    return pos;
  }

  /** Residual stream after all blocks, for [batch, seqLen] tokens; `keep` receives each block's input. */
  private trunk(adapters: AdapterSet, tokens: Int32Array, batch: number, seqLen: number, training: boolean, seed: number, keep?: Float32Array[]): Float32Array {
    const m = batch * seqLen, dim = this.config.dim;
    const x = this.scratch.f('x', m * dim);
    this.embed(tokens, x);
    const pos = this.positions(batch, seqLen), attend = this.trainingAttend(batch, seqLen);
    for (let l = 0; l < this.config.layers; l++) {
      keep?.[l].set(x);
      this.forwardBlock(l, x, m, pos, adapters, attend, training, seed);
    }
    return x;
  }

  logits(adapters: AdapterSet, tokens: Int32Array, batch: number, seqLen: number): Float32Array {
    const m = batch * seqLen;
    const x = this.trunk(adapters, tokens, batch, seqLen, false, 0);
    const { xf } = this.finalNorm(x, m);
    const out = new Float32Array(m * this.config.vocab);
    this.classify(xf, m, out);
    return out;
  }

  loss(adapters: AdapterSet, tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, mask?: Uint8Array): { loss: number; count: number } {
    const m = batch * seqLen;
    const x = this.trunk(adapters, tokens, batch, seqLen, false, 0);
    const { xf } = this.finalNorm(x, m);
    const t = this.maskedTargets(targets, mask);
    return { loss: this.classifierLoss(xf, t, m), count: countScored(t) };
  }

  private maskedTargets(targets: Int32Array, mask?: Uint8Array): Int32Array {
    if (!mask) return targets;
    const t = this.scratch.i('targets', targets.length);
    for (let i = 0; i < t.length; i++) t[i] = mask[i] ? targets[i] : -1;
    return t;
  }

  /** Σ CE over rows, chunked; with dxf, also writes d(loss)/d(xf). */
  private classifierLoss(xf: Float32Array, targets: Int32Array, m: number, dxf?: Float32Array): number {
    const { dim, vocab } = this.config;
    const rows = Math.max(1, Math.min(m, Math.floor(CLASSIFIER_CHUNK_FLOATS / vocab)));
    let total = 0;
    for (let r0 = 0; r0 < m; r0 += rows) {
      const n = Math.min(rows, m - r0);
      const logits = this.scratch.f('logits', n * vocab);
      const xs = xf.subarray(r0 * dim, (r0 + n) * dim), ts = targets.subarray(r0, r0 + n);
      this.classify(xs, n, logits, dxf !== undefined);
      if (!dxf) {
        total += this.core.cross_entropy_forward(logits, ts, n, vocab);
        continue;
      }
      total += this.core.cross_entropy_backward(logits, ts, n, vocab, 1, logits);
      this.classifier.backward(xs, logits, dxf.subarray(r0 * dim, (r0 + n) * dim), n, NO_ADAPTER, false);
    }
    return total;
  }

  // ---- backward --------------------------------------------------------------------------------------------

  lossAndGrad(adapters: AdapterSet, tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts: GradOptions): { loss: number; count: number; grads: AdapterSet } {
    const { dim, hidden, heads, kvHeads, layers } = this.config;
    const m = batch * seqLen, training = opts.training ?? false, seed = opts.seed ?? 0;
    const c = this.core, s = this.scratch;
    const inputs = Array.from({ length: layers }, (_, l) => s.f(`input${l}`, m * dim));
    const x = this.trunk(adapters, tokens, batch, seqLen, training, seed, inputs);
    const { xf, rstd } = this.finalNorm(x, m);
    const t = this.maskedTargets(targets, opts.mask);
    const dxf = s.f('dxf', m * dim);
    const loss = this.classifierLoss(xf, t, m, dxf);
    const dx = s.f('dx', m * dim);
    c.rmsnorm_backward(x, this.weights.finalNorm, rstd, dxf, dx, m, dim);

    const grads = this.gradBuffers(adapters);
    if (grads.every((set) => Object.keys(set).length === 0)) return { loss, count: countScored(t), grads }; // nothing to train
    const pos = this.positions(batch, seqLen), attend = this.trainingAttend(batch, seqLen);
    const xw = s.f('xw', m * dim), tmp = s.f('dtmp', m * dim);
    for (let l = layers - 1; l >= 0; l--) {
      xw.set(inputs[l]);
      this.recompute(l, xw, m, pos, adapters, attend, training, seed);
      const blk = this.weights.blocks[l], lin = this.linears[l];
      const call = (p: ProjectionName) => this.call(adapters, l, p, training, seed);
      const grad = (p: ProjectionName) => grads[l]?.[p];
      // FFN: out = xmid + down(swiglu(gate(xn2), up(xn2)))
      const dh = s.f('dh', m * hidden), dg = s.f('dg', m * hidden), du = s.f('du', m * hidden);
      lin.down.backward(s.f('h', m * hidden), dx, dh, m, call('down'), false, grad('down'));
      c.swiglu_backward(s.f('g', m * hidden), s.f('u', m * hidden), dh, dg, du, m * hidden);
      const xn2 = s.f('xn2', m * dim), dxn = s.f('dxn', m * dim);
      lin.gate.backward(xn2, dg, dxn, m, call('gate'), false, grad('gate'));
      lin.up.backward(xn2, du, dxn, m, call('up'), true, grad('up'));
      c.rmsnorm_backward(s.f('xmid', m * dim), blk.ffnNorm, s.f('rstd2', m), dxn, tmp, m, dim);
      c.add_inplace(dx, tmp, m * dim);
      // Attention: xmid = x + o(attn(rope(q(xn)), rope(k(xn)), v(xn)))
      const datt = s.f('datt', m * dim);
      lin.o.backward(s.f('att', m * dim), dx, datt, m, call('o'), false, grad('o'));
      const dq = s.f('dq', m * dim), dk = s.f('dk', m * this.kvDim), dv = s.f('dv', m * this.kvDim);
      c.attention_backward(s.f('q', m * dim), s.f('k', m * this.kvDim), s.f('v', m * this.kvDim), s.f('att', m * dim), s.f('lse', m * heads), datt, dq, dk, dv, batch, seqLen, seqLen, heads, kvHeads, this.headDim);
      c.rope_backward(dq, pos, m, heads, this.headDim, this.config.ropeTheta, false);
      c.rope_backward(dk, pos, m, kvHeads, this.headDim, this.config.ropeTheta, false);
      const xn = s.f('xn', m * dim);
      lin.q.backward(xn, dq, dxn, m, call('q'), false, grad('q'));
      lin.k.backward(xn, dk, dxn, m, call('k'), true, grad('k'));
      lin.v.backward(xn, dv, dxn, m, call('v'), true, grad('v'));
      if (l === 0) break; // the embeddings are frozen: nothing below block 0 needs dx
      c.rmsnorm_backward(inputs[l], blk.attnNorm, s.f('rstd1', m), dxn, tmp, m, dim);
      c.add_inplace(dx, tmp, m * dim);
    }
    return { loss, count: countScored(t), grads };
  }

  /** Gradient arrays shaped like the adapters (reused across calls while the shapes stay the same). */
  private gradBuffers(adapters: AdapterSet): AdapterSet {
    const same = this.grads && this.grads.length === adapters.length && adapters.every((blk, l) =>
      PROJECTIONS.every((p) => (blk?.[p]?.a.length ?? -1) === (this.grads![l]?.[p]?.a.length ?? -1) && (blk?.[p]?.b.length ?? -1) === (this.grads![l]?.[p]?.b.length ?? -1)));
    if (!same) {
      this.grads = adapters.map((blk) => {
        const g: AdapterSet[number] = {};
        for (const p of PROJECTIONS) {
          const ad = blk?.[p];
          if (ad && ad.rank > 0) g[p] = { rank: ad.rank, alpha: ad.alpha, a: new Float32Array(ad.a.length), b: new Float32Array(ad.b.length) };
        }
        return g;
      });
    }
    return this.grads!;
  }
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
