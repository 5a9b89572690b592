// A generation stream: per-layer K/V caches, prefill (many positions in one pass) and decode steps, alone or
// batched across sessions (the linear layers then run once over all of their rows).
import type { InferenceSession } from './llama.ts';
import type { Attend, Runner } from './runner.ts';
import type { AdapterSet } from './types.ts';
import { QaloraError } from '../errors.ts';

export class KvSession implements InferenceSession {
  private position = 0;
  // Caches grow with the sequence (doubling, up to the context): a big model's full-context cache is GBs.
  private kCache: Float32Array[];
  private vCache: Float32Array[];
  private capacity = 0;
  private readonly out: Float32Array;

  constructor(readonly runner: Runner, private readonly adapters: () => AdapterSet) {
    this.kCache = [];
    this.vCache = [];
    this.out = new Float32Array(runner.config.vocab);
  }

  private reserve(positions: number): void {
    if (positions <= this.capacity) return;
    const { layers, context } = this.runner.config, kvDim = this.runner.kvDim;
    const cap = Math.min(context, Math.max(positions, 2 * this.capacity, 64));
    const grow = (old: Float32Array[]) => Array.from({ length: layers }, (_, l) => {
      const a = new Float32Array(cap * kvDim);
      if (old[l]) a.set(old[l].subarray(0, this.position * kvDim));
      return a;
    });
    this.kCache = grow(this.kCache);
    this.vCache = grow(this.vCache);
    this.capacity = cap;
  }

  get pos(): number {
    return this.position;
  }

  reset(): void {
    this.position = 0;
  }

  truncate(n: number): void {
    if (!Number.isInteger(n) || n < 0) throw new QaloraError(`truncate: ${n} is not a position`);
    this.position = Math.min(this.position, n);
  }

  prefill(ids: number[] | Int32Array): Float32Array {
    const r = this.runner, { dim, heads, kvHeads } = r.config;
    const t = ids.length;
    if (t === 0) throw new QaloraError('prefill: no tokens given');
    this.checkRoom(t);
    const tokens = r.scratch.i('s.tokens', t), pos = r.scratch.i('s.pos', t);
    for (let i = 0; i < t; i++) {
      tokens[i] = checkId(ids[i], r.config.vocab);
      pos[i] = this.position + i;
    }
    const x = r.scratch.f('s.x', t * dim);
    r.embed(tokens, x);
    const start = this.position, kvDim = r.kvDim;
    const attend: Attend = (l, q, k, v, att, lse) => {
      this.kCache[l].set(k, start * kvDim);
      this.vCache[l].set(v, start * kvDim);
      const tk = start + t;
      r.core.attention_forward(q, this.kCache[l].subarray(0, tk * kvDim), this.vCache[l].subarray(0, tk * kvDim), att, lse, 1, t, tk, heads, kvHeads, r.headDim);
    };
    const adapters = this.adapters();
    for (let l = 0; l < r.config.layers; l++) r.forwardBlock(l, x, t, pos, adapters, attend);
    const { xf } = r.finalNorm(x.subarray((t - 1) * dim), 1);
    r.classify(xf, 1, this.out);
    this.position += t;
    return this.out;
  }

  step(id: number): Float32Array {
    return this.prefill([id]);
  }

  private checkRoom(n: number): void {
    const ctx = this.runner.config.context;
    if (this.position + n > ctx) throw new QaloraError(`the sequence would reach position ${this.position + n}, beyond the model's context of ${ctx}`);
    this.reserve(this.position + n);
  }

  static stepBatch(r: Runner, adapters: AdapterSet, sessions: KvSession[], ids: number[]): Float32Array[] {
    const n = sessions.length;
    if (n === 0) return [];
    if (new Set(sessions).size !== n) throw new QaloraError('stepBatch: a session appears twice');
    if (n === 1) return [sessions[0].step(ids[0])];
    const { dim, heads, kvHeads, vocab } = r.config, kvDim = r.kvDim, hd = r.headDim;
    const tokens = r.scratch.i('b.tokens', n), pos = r.scratch.i('b.pos', n);
    sessions.forEach((s, i) => {
      s.checkRoom(1);
      tokens[i] = checkId(ids[i], vocab);
      pos[i] = s.position;
    });
    const x = r.scratch.f('b.x', n * dim);
    r.embed(tokens, x);
    const attend: Attend = (l, q, k, v, att, lse) => {
      for (let i = 0; i < n; i++) {
        const s = sessions[i], p = s.position;
        s.kCache[l].set(k.subarray(i * kvDim, (i + 1) * kvDim), p * kvDim);
        s.vCache[l].set(v.subarray(i * kvDim, (i + 1) * kvDim), p * kvDim);
        r.core.attention_forward(q.subarray(i * dim, (i + 1) * dim), s.kCache[l].subarray(0, (p + 1) * kvDim), s.vCache[l].subarray(0, (p + 1) * kvDim),
          att.subarray(i * dim, (i + 1) * dim), lse.subarray(i * heads, (i + 1) * heads), 1, 1, p + 1, heads, kvHeads, hd);
      }
    };
    for (let l = 0; l < r.config.layers; l++) r.forwardBlock(l, x, n, pos, adapters, attend);
    const { xf } = r.finalNorm(x, n);
    const logits = r.scratch.f('b.logits', n * vocab);
    r.classify(xf, n, logits);
    return sessions.map((s, i) => {
      s.out.set(logits.subarray(i * vocab, (i + 1) * vocab));
      s.position++;
      return s.out;
    });
  }
}

function checkId(id: number, vocab: number): number {
  if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new QaloraError(`token id ${id} is outside the vocabulary [0, ${vocab})`);
  return id;
}
