// A generation stream: per-layer K/V caches, prefill (many positions in one pass) and decode steps, alone or
// batched across sessions (the linear layers then run once over all of their rows). The caches live where the
// model's tensors do (Runner.mem): on a GPU backend they hold fp16 (half the memory and bandwidth of fp32, cast
// on the device as rows are appended), and a decode step uploads its token ids and positions in one copy, runs
// every op on the device and waits once, for the logits. On the CPU they stay fp32.
import type { InferenceSession } from './llama.ts';
import type { Attend, Runner } from './runner.ts';
import type { AdapterSet } from './types.ts';
import { Grown, type F32, type I32, type U16 } from './memory.ts';
import { QaloraError } from '../errors.ts';

/** Buffers of the steps of a model's sessions (one step runs at a time). */
interface StepWork {
  x: Grown<F32>;
  ints: Grown<I32>;
  logits: Grown<F32>;
}
const stepWork = new WeakMap<Runner, StepWork>();
function workOf(r: Runner): StepWork {
  let w = stepWork.get(r);
  if (!w) {
    const mem = r.mem;
    w = { x: new Grown(mem, (n) => mem.f32(n)), ints: new Grown(mem, (n) => mem.i32(n)), logits: new Grown(mem, (n) => mem.f32(n)) };
    stepWork.set(r, w);
  }
  return w;
}

/** Ids and positions in one host array, uploaded in one copy: [tokens | positions]. */
function idsAndPositions(r: Runner, tokens: Int32Array, positions: Int32Array): { ids: I32; pos: I32 } {
  const n = tokens.length, both = new Int32Array(2 * n);
  both.set(tokens);
  both.set(positions, n);
  const onBackend = r.toBackend(both, workOf(r).ints);
  return { ids: r.mem.view(onBackend, 0, n), pos: r.mem.view(onBackend, n, n) };
}

/** A layer's cache rows: fp32 on the host, fp16 bits on a device. */
type Cache = F32 | U16;

export class KvSession implements InferenceSession {
  private position = 0;
  // Caches grow with the sequence (doubling, up to the context): a big model's full-context cache is GBs.
  private kCache: Cache[] = [];
  private vCache: Cache[] = [];
  private capacity = 0;
  private readonly out: Float32Array;
  private readonly half: boolean;

  constructor(readonly runner: Runner, private readonly adapters: () => AdapterSet) {
    this.out = new Float32Array(runner.config.vocab);
    this.half = runner.mem.device;
  }

  private reserve(positions: number): void {
    if (positions <= this.capacity) return;
    const r = this.runner, mem = r.mem, { layers, context } = r.config, kvDim = r.kvDim;
    const cap = Math.min(context, Math.max(positions, 2 * this.capacity, 64));
    const grow = (old: Cache[]) => Array.from({ length: layers }, (_, l) => {
      const a: Cache = this.half ? mem.u16(cap * kvDim) : mem.f32(cap * kvDim);
      if (old[l]) {
        mem.copy(a, mem.view(old[l], 0, this.position * kvDim));
        mem.free(old[l]);
      }
      return a;
    });
    this.kCache = grow(this.kCache);
    this.vCache = grow(this.vCache);
    this.capacity = cap;
  }

  /** Rows k, v [n, kvDim] of layer l into the caches at position `at` (cast to fp16 on a device). */
  private store(l: number, k: F32, v: F32, at: number, n: number): void {
    const r = this.runner, mem = r.mem, kvDim = r.kvDim, len = n * kvDim;
    if (!this.half) {
      mem.copy(this.kCache[l] as F32, k, at * kvDim);
      mem.copy(this.vCache[l] as F32, v, at * kvDim);
      return;
    }
    r.core.f32_to_f16(k, mem.view(this.kCache[l] as U16, at * kvDim, len), len);
    r.core.f32_to_f16(v, mem.view(this.vCache[l] as U16, at * kvDim, len), len);
  }

  /** att, lse for tq query rows q against the first tk cached positions of layer l. */
  private attendCache(l: number, q: F32, att: F32, lse: F32, tq: number, tk: number): void {
    const r = this.runner, mem = r.mem, { heads, kvHeads } = r.config, n = tk * r.kvDim;
    const k = mem.view(this.kCache[l], 0, n), v = mem.view(this.vCache[l], 0, n);
    if (this.half) r.core.attention_forward_kv16(q, k as U16, v as U16, att, lse, 1, tq, tk, heads, kvHeads, r.headDim);
    else r.core.attention_forward(q, k as F32, v as F32, att, lse, 1, tq, tk, heads, kvHeads, r.headDim);
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

  /** A new prompt: the adapters are synced to the backend first (they may have been trained since). */
  prefill(ids: number[] | Int32Array): Float32Array {
    this.runner.syncAdapters(this.adapters());
    return this.feed(ids);
  }

  step(id: number): Float32Array {
    return this.feed([id]);
  }

  private feed(ids: number[] | Int32Array): Float32Array {
    const r = this.runner, mem = r.mem, { dim, vocab } = r.config;
    const t = ids.length;
    if (t === 0) throw new QaloraError('prefill: no tokens given');
    this.checkRoom(t);
    const tokens = new Int32Array(t), positions = new Int32Array(t);
    for (let i = 0; i < t; i++) {
      tokens[i] = checkId(ids[i], vocab);
      positions[i] = this.position + i;
    }
    const work = workOf(r);
    const { ids: onBackend, pos } = idsAndPositions(r, tokens, positions);
    const x = work.x.get(t * dim);
    r.embed(tokens, onBackend, x);
    const start = this.position;
    const attend: Attend = (l, q, k, v, att, lse) => {
      this.store(l, k, v, start, t);
      this.attendCache(l, q, att, lse, t, start + t);
    };
    const adapters = this.adapters();
    r.ensureAdapters(adapters);
    for (let l = 0; l < r.config.layers; l++) r.forwardBlock(l, x, t, pos, adapters, attend);
    const { xf } = r.finalNorm(mem.view(x, (t - 1) * dim, dim), 1);
    const logits = mem.device ? work.logits.get(vocab) : this.out;
    r.classify(xf, 1, logits);
    mem.read(logits, this.out);
    this.position += t;
    return this.out;
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
    const mem = r.mem, { dim, heads, vocab } = r.config, kvDim = r.kvDim;
    const tokens = new Int32Array(n), positions = new Int32Array(n);
    sessions.forEach((s, i) => {
      s.checkRoom(1);
      tokens[i] = checkId(ids[i], vocab);
      positions[i] = s.position;
    });
    const work = workOf(r);
    const { ids: onBackend, pos } = idsAndPositions(r, tokens, positions);
    const x = work.x.get(n * dim);
    r.embed(tokens, onBackend, x);
    const attend: Attend = (l, q, k, v, att, lse) => {
      for (let i = 0; i < n; i++) {
        const s = sessions[i], p = s.position;
        s.store(l, mem.view(k, i * kvDim, kvDim), mem.view(v, i * kvDim, kvDim), p, 1);
        s.attendCache(l, mem.view(q, i * dim, dim), mem.view(att, i * dim, dim), mem.view(lse, i * heads, heads), 1, p + 1);
      }
    };
    r.ensureAdapters(adapters);
    for (let l = 0; l < r.config.layers; l++) r.forwardBlock(l, x, n, pos, adapters, attend);
    const { xf } = r.finalNorm(x, n);
    const all = new Float32Array(n * vocab);
    const logits = mem.device ? work.logits.get(n * vocab) : all;
    r.classify(xf, n, logits);
    mem.read(logits, all);
    return sessions.map((s, i) => {
      s.out.set(all.subarray(i * vocab, (i + 1) * vocab));
      s.position++;
      return s.out;
    });
  }
}

function checkId(id: number, vocab: number): number {
  if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new QaloraError(`token id ${id} is outside the vocabulary [0, ${vocab})`);
  return id;
}
