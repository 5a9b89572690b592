// Next-token sampling as llama2.c does it (so a seed reproduces its runs): greedy argmax (ties → lowest id),
// temperature, softmax in fp32, one xorshift64* "coin" per token, and top-p by sorting the candidates above
// (1 − p)/(n − 1) and drawing coin · (mass of the nucleus). Additions llama2.c lacks: top-k (applied before
// softmax) and the CTRL/HF repetition penalty (applied to the raw logits). Stop strings and token limits are
// tracked by StopStrings / the caller's loop.
import { QaloraError } from './errors.ts';

export interface SamplingOptions {
  /** 0: greedy. llama2.c's default is 1. */
  temperature?: number;
  /** Keep only the k most likely tokens (0: off). */
  topK?: number;
  /** Nucleus mass in (0, 1); 0 or ≥ 1: off. llama2.c's default is 0.9. */
  topP?: number;
  /** > 1 discourages tokens already in the history: positive logits divided by it, negative multiplied. */
  repetitionPenalty?: number;
  /** How many of the most recent tokens the penalty looks at (default: all given). */
  repetitionWindow?: number;
  /** RNG seed (llama2.c's xorshift64* state); 0 is replaced by a fixed non-zero state. */
  seed?: number;
}

/** llama2.c's xorshift64* on two u32 halves (no BigInt in the per-token path). */
export class XorShift64Star {
  private hi: number;
  private lo: number;
  constructor(seed: number) {
    const s = Number.isFinite(seed) && seed !== 0 ? seed : 0x2545f491;
    this.lo = s >>> 0;
    this.hi = Math.floor(Math.abs(s) / 2 ** 32) >>> 0;
  }
  /** random_u32: state ^= state >> 12; ^= state << 25; ^= state >> 27; return (state · 0x2545F4914F6CDD1D) >> 32. */
  nextU32(): number {
    let { hi, lo } = this;
    // state ^= state >> 12
    lo = (lo ^ ((lo >>> 12) | (hi << 20))) >>> 0;
    hi = (hi ^ (hi >>> 12)) >>> 0;
    // state ^= state << 25
    hi = (hi ^ ((hi << 25) | (lo >>> 7))) >>> 0;
    lo = (lo ^ (lo << 25)) >>> 0;
    // state ^= state >> 27
    lo = (lo ^ ((lo >>> 27) | (hi << 5))) >>> 0;
    hi = (hi ^ (hi >>> 27)) >>> 0;
    this.hi = hi;
    this.lo = lo;
    // high 32 bits of the low 64 bits of state · M, M = 0x2545F4914F6CDD1D
    return mulHi64(hi, lo, 0x2545f491, 0x4f6cdd1d);
  }
  /** random_f32: (u32 >> 8) / 2^24 in [0, 1). */
  nextF32(): number {
    return (this.nextU32() >>> 8) / 16777216;
  }
}

/** Bits 32..63 of (ah·2^32 + al)·(bh·2^32 + bl) mod 2^64, with 16-bit limbs so every product is exact. */
function mulHi64(ah: number, al: number, bh: number, bl: number): number {
  const a = [al & 0xffff, al >>> 16, ah & 0xffff, ah >>> 16];
  const b = [bl & 0xffff, bl >>> 16, bh & 0xffff, bh >>> 16];
  const r = [0, 0, 0, 0];
  for (let i = 0; i < 4; i++) {
    let carry = 0;
    for (let j = 0; i + j < 4; j++) {
      const t = r[i + j] + a[i] * b[j] + carry;
      r[i + j] = t % 65536;
      carry = Math.floor(t / 65536);
    }
  }
  return ((r[3] << 16) | r[2]) >>> 0;
}

/** Index of the largest value; ties → the lowest index (llama2.c's strict >). */
export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** In-place fp32 softmax as llama2.c: subtract the max, exp, normalise. */
export function softmaxF32(x: Float32Array): Float32Array {
  let max = x[0];
  for (let i = 1; i < x.length; i++) if (x[i] > max) max = x[i];
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    x[i] = Math.exp(Math.fround(x[i] - max));
    sum = Math.fround(sum + x[i]);
  }
  for (let i = 0; i < x.length; i++) x[i] /= sum;
  return x;
}

/** llama2.c sample_mult: the first index whose cumulative probability exceeds the coin. */
export function sampleMult(probs: Float32Array, coin: number): number {
  let cdf = 0;
  for (let i = 0; i < probs.length; i++) {
    cdf = Math.fround(cdf + probs[i]);
    if (coin < cdf) return i;
  }
  return probs.length - 1;
}

/** llama2.c sample_topp (ties in probability ordered by id, where llama2.c's qsort leaves them unspecified). */
export function sampleTopP(probs: Float32Array, topp: number, coin: number): number {
  const n = probs.length;
  const cutoff = Math.fround(Math.fround(1 - topp) / (n - 1));
  const idx: number[] = [];
  for (let i = 0; i < n; i++) if (probs[i] >= cutoff) idx.push(i);
  idx.sort((a, b) => probs[b] - probs[a] || a - b);
  let cumulative = 0;
  let last = idx.length - 1;
  for (let i = 0; i < idx.length; i++) {
    cumulative = Math.fround(cumulative + probs[idx[i]]);
    if (cumulative > topp) { last = i; break; }
  }
  const r = Math.fround(coin * cumulative);
  let cdf = 0;
  for (let i = 0; i <= last; i++) {
    cdf = Math.fround(cdf + probs[idx[i]]);
    if (r < cdf) return idx[i];
  }
  return idx[last];
}

export class Sampler {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly repetitionPenalty: number;
  readonly repetitionWindow: number;
  private readonly rng: XorShift64Star;
  private readonly scratch: Float32Array;

  constructor(readonly vocabSize: number, opts: SamplingOptions = {}) {
    this.temperature = opts.temperature ?? 1;
    this.topK = opts.topK ?? 0;
    this.topP = opts.topP ?? 0.9;
    this.repetitionPenalty = opts.repetitionPenalty ?? 1;
    this.repetitionWindow = opts.repetitionWindow ?? Infinity;
    const bad = (what: string) => new QaloraError(`sampling: ${what}`);
    if (!(this.temperature >= 0) || !Number.isFinite(this.temperature)) throw bad(`temperature must be ≥ 0, got ${opts.temperature}`);
    if (!(Number.isInteger(this.topK) && this.topK >= 0)) throw bad(`top-k must be a non-negative integer, got ${opts.topK}`);
    if (!(this.topP >= 0)) throw bad(`top-p must be ≥ 0 (0 or ≥ 1: off), got ${opts.topP}`);
    if (!(this.repetitionPenalty > 0)) throw bad(`repetition penalty must be > 0, got ${opts.repetitionPenalty}`);
    if (!(this.repetitionWindow >= 0)) throw bad(`repetition window must be ≥ 0, got ${opts.repetitionWindow}`);
    if (opts.seed !== undefined && !(Number.isInteger(opts.seed) && opts.seed >= 0 && opts.seed <= Number.MAX_SAFE_INTEGER)) {
      throw bad(`seed must be a non-negative integer, got ${opts.seed}`);
    }
    this.rng = new XorShift64Star(opts.seed ?? Date.now());
    this.scratch = new Float32Array(vocabSize);
  }

  /** The next token from `logits` (not modified); `history` is what the penalty looks at. */
  sample(logits: ArrayLike<number>, history: readonly number[] = []): number {
    if (logits.length < this.vocabSize) throw new QaloraError(`sampling: ${logits.length} logits for a vocabulary of ${this.vocabSize}`);
    const x = this.scratch;
    for (let i = 0; i < this.vocabSize; i++) x[i] = logits[i];
    if (this.repetitionPenalty !== 1) {
      const seen = new Set(history.slice(Math.max(0, history.length - this.repetitionWindow)));
      for (const t of seen) {
        if (t >= 0 && t < this.vocabSize) x[t] = x[t] > 0 ? x[t] / this.repetitionPenalty : x[t] * this.repetitionPenalty;
      }
    }
    if (this.temperature === 0) return argmax(x);
    if (this.topK > 0 && this.topK < this.vocabSize) {
      const order = Array.from({ length: this.vocabSize }, (_, i) => i).sort((a, b) => x[b] - x[a] || a - b);
      for (let r = this.topK; r < order.length; r++) x[order[r]] = -Infinity;
    }
    for (let i = 0; i < this.vocabSize; i++) x[i] /= this.temperature;
    softmaxF32(x);
    const coin = this.rng.nextF32();
    return this.topP <= 0 || this.topP >= 1 ? sampleMult(x, coin) : sampleTopP(x, this.topP, coin);
  }
}

/**
 * Streams text while watching for stop strings: text that could still become a stop string is held back, so
 * a stop string is never printed; push() returns what may be printed now and whether generation must stop.
 */
export class StopStrings {
  private pending = '';
  private stopped = false;
  constructor(private readonly stops: readonly string[]) {
    if (stops.some((s) => s.length === 0)) throw new QaloraError('stop strings must not be empty');
  }

  push(text: string): { text: string; stop: boolean } {
    if (this.stopped) return { text: '', stop: true };
    this.pending += text;
    let cut = -1;
    for (const s of this.stops) {
      const at = this.pending.indexOf(s);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.stopped = true;
      const out = this.pending.slice(0, cut);
      this.pending = '';
      return { text: out, stop: true };
    }
    // Hold back the longest suffix that is a proper prefix of some stop string.
    let hold = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, this.pending.length); k > hold; k--) {
        if (this.pending.endsWith(s.slice(0, k))) { hold = k; break; }
      }
    }
    const out = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return { text: out, stop: false };
  }

  /** What is still held back once generation ends without a stop string. */
  flush(): string {
    const out = this.stopped ? '' : this.pending;
    this.pending = '';
    return out;
  }

  get hit(): boolean {
    return this.stopped;
  }
}
