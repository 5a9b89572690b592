// Packing a token stream into fixed-length windows, the held-out split, and the deterministic order in which
// training visits them. The order depends only on (seed, epoch), and a run's data position is the number of
// windows consumed so far — so a resumed run sees exactly the batches an uninterrupted one would.
import { QaloraError } from '../errors.ts';
import type { TokenStream } from './tokenize.ts';
import { uniformStream } from '../random.ts';

export interface Batch {
  /** [batch, seqLen] inputs, row-major. */
  tokens: Int32Array;
  /** [batch, seqLen] next-token targets. */
  targets: Int32Array;
  /** [batch, seqLen] 1 where the target counts in the loss. */
  mask: Uint8Array;
  batch: number;
  seqLen: number;
  /** Targets that count (the loss's denominator). */
  count: number;
}

/** Window w covers inputs stream[w·T, w·T + T) and targets one position later; the tail window is padded. */
export class PackedWindows {
  readonly count: number;
  constructor(
    readonly stream: TokenStream,
    readonly seqLen: number,
    /** Windows [first, first + count) of the whole packing. */
    readonly first = 0,
    count?: number,
    readonly padToken = 0,
  ) {
    if (!Number.isInteger(seqLen) || seqLen < 1) throw new QaloraError(`sequence length must be a positive integer, got ${seqLen}`);
    const total = Math.ceil(Math.max(0, stream.tokens.length - 1) / seqLen);
    this.count = count ?? total - first;
  }

  /** Writes window i into row `row` of the batch arrays; returns how many targets count. */
  fill(i: number, tokens: Int32Array, targets: Int32Array, mask: Uint8Array, row: number): number {
    if (i < 0 || i >= this.count) throw new RangeError(`window ${i} out of range [0, ${this.count})`);
    const T = this.seqLen, src = this.stream, n = src.tokens.length;
    const base = (this.first + i) * T;
    let counted = 0;
    for (let t = 0; t < T; t++) {
      const p = base + t;
      const o = row * T + t;
      if (p + 1 < n) {
        tokens[o] = src.tokens[p];
        targets[o] = src.tokens[p + 1];
        mask[o] = src.mask[p + 1];
        counted += mask[o];
      } else {
        tokens[o] = p < n ? src.tokens[p] : this.padToken;
        targets[o] = this.padToken;
        mask[o] = 0;
      }
    }
    return counted;
  }

  batch(indices: number[]): Batch {
    const T = this.seqLen, B = indices.length;
    const tokens = new Int32Array(B * T), targets = new Int32Array(B * T), mask = new Uint8Array(B * T);
    let count = 0;
    indices.forEach((w, row) => (count += this.fill(w, tokens, targets, mask, row)));
    return { tokens, targets, mask, batch: B, seqLen: T, count };
  }

  /** Targets that count over all windows. */
  targetCount(): number {
    let c = 0;
    const n = this.stream.tokens.length;
    const lo = this.first * this.seqLen + 1, hi = Math.min(n, (this.first + this.count) * this.seqLen + 1);
    for (let p = lo; p < hi; p++) c += this.stream.mask[p];
    return c;
  }
}

export interface Split {
  train: PackedWindows;
  val: PackedWindows | null;
}

/**
 * Held-out validation: the last `valFraction` of the windows (at least one when there are two or more), taken
 * from the end of the data so no training window overlaps a validation one.
 */
export function splitWindows(stream: TokenStream, seqLen: number, valFraction: number, padToken = 0): Split {
  const all = new PackedWindows(stream, seqLen, 0, undefined, padToken);
  if (all.count === 0) throw new QaloraError(`the data has ${stream.tokens.length} tokens: too few for one window of ${seqLen}`);
  if (!(valFraction >= 0 && valFraction < 1)) throw new QaloraError(`validation fraction must be in [0, 1), got ${valFraction}`);
  let nVal = Math.ceil(all.count * valFraction);
  if (valFraction > 0 && all.count >= 2) nVal = Math.max(1, Math.min(all.count - 1, nVal));
  else nVal = 0;
  const nTrain = all.count - nVal;
  // Full windows only for training when possible: the padded tail belongs to validation.
  return {
    train: new PackedWindows(stream, seqLen, 0, nTrain, padToken),
    val: nVal > 0 ? new PackedWindows(stream, seqLen, nTrain, nVal, padToken) : null,
  };
}

/** Mixes integers into one 32-bit seed (for per-epoch and per-step streams derived from the run's seed). */
export function mixSeed(...xs: number[]): number {
  let h = 0x811c9dc5;
  for (const x of xs) {
    h = Math.imul(h ^ (x >>> 0), 0x01000193) >>> 0;
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
    h = (h ^ Math.floor(x / 4294967296)) >>> 0;
  }
  return h >>> 0;
}

/** A permutation of [0, n) depending only on (seed, epoch): Fisher-Yates over a mulberry32 stream. */
export function epochOrder(n: number, seed: number, epoch: number, shuffle = true): Int32Array {
  const order = new Int32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  if (!shuffle) return order;
  const rnd = uniformStream(mixSeed(seed, epoch, 0x5eed));
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    const t = order[i]; order[i] = order[j]; order[j] = t;
  }
  return order;
}

/** The training data's visiting order: position k (windows consumed) → window index, across epochs. */
export class WindowSchedule {
  private cachedEpoch = -1;
  private order: Int32Array = new Int32Array(0);
  constructor(readonly windows: number, readonly seed: number, readonly shuffle = true) {
    if (windows < 1) throw new QaloraError('no training windows');
  }
  epochOf(position: number): number {
    return Math.floor(position / this.windows);
  }
  windowAt(position: number): number {
    const e = this.epochOf(position);
    if (e !== this.cachedEpoch) {
      this.order = epochOrder(this.windows, this.seed, e, this.shuffle);
      this.cachedEpoch = e;
    }
    return this.order[position - e * this.windows];
  }
  /** The next `count` window indices from `position`. */
  take(position: number, count: number): number[] {
    const out: number[] = [];
    for (let k = 0; k < count; k++) out.push(this.windowAt(position + k));
    return out;
  }
}
