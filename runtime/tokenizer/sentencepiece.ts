// SentencePiece-BPE as llama2.c runs it: dummy-prefix space, each UTF-8 character to its piece or to
// byte-fallback tokens, then repeatedly merge the adjacent pair whose concatenation is a piece with the highest
// score (leftmost on ties). A heap over live pairs makes that O(n log n) instead of llama2.c's O(n²), with the
// same result: pairs are ordered by (score desc, left position asc), and positions keep their order as pairs merge.
// Pairs are looked up by id (a table of every way a piece splits into two pieces), so merging builds no strings.
import { QaloraError } from '../errors.ts';
import type { EncodeOptions, Tokenizer } from './types.ts';

/** GGUF / SentencePiece token types. */
export const TokenType = { normal: 1, unknown: 2, control: 3, userDefined: 4, unused: 5, byte: 6 } as const;

export interface SentencePieceVocab {
  /** Piece bytes with spaces as 0x20 (SentencePiece's U+2581 already replaced). */
  pieces: Uint8Array[];
  scores: Float32Array | number[];
  /** Optional per-token types (GGUF); without them byte tokens are recognised by their "<0xNN>" text. */
  types?: ArrayLike<number>;
  bos: number;
  eos: number;
  /** Where the vocabulary came from, for error messages. */
  source: string;
}

const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;
const latin1 = new TextDecoder('latin1');
const utf8 = new TextDecoder('utf-8');
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const encoder = new TextEncoder();

export class SentencePieceBpe implements Tokenizer {
  readonly bos: number;
  readonly eos: number;
  readonly vocabSize: number;
  private readonly pieces: Uint8Array[];
  private readonly scores: Float32Array;
  /** piece text → id, for pieces text can merge into (not control, unknown or byte tokens). */
  private readonly lookup = new Map<string, number>();
  /** left id · vocabSize + right id → merged id; built on first use. */
  private pairTable: Map<number, number> | null = null;
  /** byte value → its fallback token id (-1 when the vocabulary lacks it). */
  private readonly byteToken = new Int32Array(256).fill(-1);
  /** token id → the byte it stands for, or -1. */
  private readonly tokenByte: Int16Array;
  private readonly silent: Uint8Array;

  constructor(v: SentencePieceVocab) {
    const n = v.pieces.length;
    if (v.scores.length !== n) throw new QaloraError(`${v.source}: ${n} tokens but ${v.scores.length} scores`);
    if (v.types && v.types.length !== n) throw new QaloraError(`${v.source}: ${n} tokens but ${v.types.length} token types`);
    for (const [what, id] of [['BOS', v.bos], ['EOS', v.eos]] as const) {
      if (!Number.isInteger(id) || id < 0 || id >= n) throw new QaloraError(`${v.source}: ${what} id ${id} is outside the vocabulary of ${n}`);
    }
    this.pieces = v.pieces;
    this.scores = Float32Array.from(v.scores);
    this.bos = v.bos;
    this.eos = v.eos;
    this.vocabSize = n;
    this.tokenByte = new Int16Array(n).fill(-1);
    this.silent = new Uint8Array(n);
    for (let id = 0; id < n; id++) {
      const type = v.types?.[id] ?? TokenType.normal;
      const text = latin1.decode(v.pieces[id]);
      const m = BYTE_PIECE.exec(text);
      if (m && (type === TokenType.byte || !v.types)) {
        const b = parseInt(m[1], 16);
        this.tokenByte[id] = b;
        if (this.byteToken[b] < 0) this.byteToken[b] = id;
        continue;
      }
      if (type === TokenType.control || type === TokenType.unknown) {
        this.silent[id] = 1;
        continue;
      }
      if (!v.types && (id === v.bos || id === v.eos)) continue; // llama2.c's "\n<s>\n": never produced by merging
      let key: string;
      try {
        key = strictUtf8.decode(v.pieces[id]);
      } catch {
        continue; // not UTF-8: no text can produce it
      }
      if (!this.lookup.has(key)) this.lookup.set(key, id);
    }
    this.silent[v.bos] = 1;
    this.silent[v.eos] = 1;
  }

  /** The raw piece of a token (spaces as spaces, byte tokens still as their "<0xNN>" text). */
  piece(id: number): string {
    this.check(id);
    return utf8.decode(this.pieces[id]);
  }

  score(id: number): number {
    this.check(id);
    return this.scores[id];
  }

  encode(text: string, opts: EncodeOptions = {}): number[] {
    const ids: number[] = [];
    const pushChar = (ch: string) => {
      const id = this.lookup.get(ch);
      if (id !== undefined) {
        ids.push(id);
        return;
      }
      for (const b of encoder.encode(ch)) {
        const t = this.byteToken[b];
        if (t < 0) throw new QaloraError(`cannot encode ${JSON.stringify(ch)}: the vocabulary has neither the character nor a <0x${b.toString(16).toUpperCase().padStart(2, '0')}> byte token`);
        ids.push(t);
      }
    };
    if (text.length > 0) pushChar(' ');
    for (const ch of text) pushChar(ch); // code points
    const merged = this.merge(ids);
    if (opts.bos) merged.unshift(this.bos);
    if (opts.eos) merged.push(this.eos);
    return merged;
  }

  /** Every split of every mergeable piece into two mergeable pieces. */
  private pairs(): Map<number, number> {
    if (this.pairTable) return this.pairTable;
    const table = new Map<number, number>();
    const V = this.vocabSize;
    for (const [piece, id] of this.lookup) {
      for (let k = 1; k < piece.length; k++) {
        const c = piece.charCodeAt(k);
        if (c >= 0xdc00 && c <= 0xdfff) continue; // never split a surrogate pair
        const a = this.lookup.get(piece.slice(0, k));
        if (a === undefined) continue;
        const b = this.lookup.get(piece.slice(k));
        if (b !== undefined) table.set(a * V + b, id);
      }
    }
    this.pairTable = table;
    return table;
  }

  private merge(ids: number[]): number[] {
    const n = ids.length;
    if (n < 2) return ids;
    const pairs = this.pairs();
    const V = this.vocabSize;
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    const version = new Int32Array(n);
    for (let i = 0; i < n; i++) { next[i] = i + 1; prev[i] = i - 1; }
    next[n - 1] = -1;
    // Each merge pushes at most two pairs: 3n entries always suffice.
    const heap = new PairHeap(3 * n + 4);
    const consider = (l: number) => {
      const r = next[l];
      if (r < 0) return;
      const id = pairs.get(ids[l] * V + ids[r]);
      if (id !== undefined) heap.push(this.scores[id], l, version[l], version[r], id);
    };
    for (let i = 0; i + 1 < n; i++) consider(i);
    while (heap.size > 0) {
      const e = heap.pop();
      const l = heap.left[e];
      const r = next[l];
      if (version[l] !== heap.vl[e] || r < 0 || version[r] !== heap.vr[e]) continue; // stale
      ids[l] = heap.id[e];
      version[l]++;
      version[r] = -1;
      next[l] = next[r];
      if (next[r] >= 0) prev[next[r]] = l;
      if (prev[l] >= 0) consider(prev[l]);
      consider(l);
    }
    const out: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) out.push(ids[i]);
    return out;
  }

  pieceBytes(prev: number, id: number): Uint8Array {
    this.check(id);
    if (this.silent[id]) return new Uint8Array(0);
    const b = this.tokenByte[id];
    if (b >= 0) return Uint8Array.of(b);
    const p = this.pieces[id];
    // SentencePiece's decoder strips the dummy-prefix space of the first piece after BOS (llama2.c PR #89).
    return prev === this.bos && p[0] === 0x20 ? p.subarray(1) : p;
  }

  decodeToken(prev: number, id: number): string {
    const p = this.pieceBytes(prev, id);
    // llama2.c's safe_printf: a single byte that is neither printable nor whitespace is not printed.
    if (p.length === 1 && !((p[0] >= 0x20 && p[0] < 0x7f) || (p[0] >= 0x09 && p[0] <= 0x0d))) return '';
    return utf8.decode(p);
  }

  decode(ids: readonly number[]): string {
    const parts: Uint8Array[] = [];
    let total = 0;
    for (let i = 0; i < ids.length; i++) {
      const p = this.pieceBytes(i > 0 ? ids[i - 1] : -1, ids[i]);
      parts.push(p);
      total += p.length;
    }
    const all = new Uint8Array(total);
    let o = 0;
    for (const p of parts) { all.set(p, o); o += p.length; }
    return utf8.decode(all);
  }

  private check(id: number): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
      throw new QaloraError(`token id ${id} is outside the vocabulary (0..${this.vocabSize - 1})`);
    }
  }
}

/**
 * A binary max-heap on (score desc, left asc). Entries live in typed arrays; the heap orders entry indices, and
 * pop() returns the index of the popped entry (valid until the next push).
 */
class PairHeap {
  readonly score: Float64Array;
  readonly left: Int32Array;
  readonly vl: Int32Array;
  readonly vr: Int32Array;
  readonly id: Int32Array;
  private readonly heap: Int32Array;
  private free: number[] = [];
  private used = 0;
  size = 0;

  constructor(capacity: number) {
    this.score = new Float64Array(capacity);
    this.left = new Int32Array(capacity);
    this.vl = new Int32Array(capacity);
    this.vr = new Int32Array(capacity);
    this.id = new Int32Array(capacity);
    this.heap = new Int32Array(capacity);
  }

  private before(a: number, b: number): boolean {
    const sa = this.score[a], sb = this.score[b];
    return sa > sb || (sa === sb && this.left[a] < this.left[b]);
  }

  push(score: number, left: number, vl: number, vr: number, id: number): void {
    const e = this.free.length > 0 ? this.free.pop()! : this.used++;
    this.score[e] = score; this.left[e] = left; this.vl[e] = vl; this.vr[e] = vr; this.id[e] = id;
    const h = this.heap;
    let i = this.size++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(e, h[p])) break;
      h[i] = h[p];
      i = p;
    }
    h[i] = e;
  }

  pop(): number {
    const h = this.heap;
    const top = h[0];
    const last = h[--this.size];
    let i = 0;
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      if (l >= this.size) break;
      const c = r < this.size && this.before(h[r], h[l]) ? r : l;
      if (!this.before(h[c], last)) break;
      h[i] = h[c];
      i = c;
    }
    if (this.size > 0) h[i] = last;
    this.free.push(top);
    return top;
  }
}
