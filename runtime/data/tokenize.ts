// Examples → one token stream with a per-position target mask. Each example becomes BOS + tokens + EOS; a
// position's mask says whether predicting that token counts in the loss (context parts and BOS never do).
import type { Example } from './examples.ts';

/** What the data pipeline needs from a tokenizer (adapt any runtime tokenizer to it with `dataTokenizer`). */
export interface DataTokenizer {
  /** Text → ids, without BOS/EOS. */
  encode(text: string): number[];
  bos: number;
  eos: number;
  /** Identifies the vocabulary and encoding rules, for the token cache key. */
  fingerprint: string;
}

export interface TokenStream {
  tokens: Int32Array;
  /** mask[i] = 1: tokens[i] is a loss target (when predicted from tokens[..i-1]). */
  mask: Uint8Array;
  /** Index in `tokens` where each example's BOS sits. */
  starts: Int32Array;
}

/**
 * Token ids of each part, cut where the part boundaries fall in the whole example's encoding: the whole text is
 * encoded once (so tokenization matches inference) and each boundary is the length of the encoded prefix —
 * the convention of the Alpaca reference code for masking the prompt.
 */
export function tokenizeExample(ex: Example, tok: DataTokenizer): { ids: number[]; train: Uint8Array } {
  const full = ex.parts.map((p) => p.text).join('');
  const ids = tok.encode(full);
  const train = new Uint8Array(ids.length);
  let prefix = '';
  let start = 0;
  for (let j = 0; j < ex.parts.length; j++) {
    prefix += ex.parts[j].text;
    const end = j === ex.parts.length - 1 ? ids.length : Math.min(ids.length, tok.encode(prefix).length);
    if (ex.parts[j].train) train.fill(1, start, Math.max(start, end));
    start = Math.max(start, end);
  }
  return { ids, train };
}

export function tokenizeExamples(examples: Example[], tok: DataTokenizer, onProgress?: (done: number) => void): TokenStream {
  const chunks: { ids: number[]; train: Uint8Array }[] = [];
  let total = 0;
  for (let i = 0; i < examples.length; i++) {
    const c = tokenizeExample(examples[i], tok);
    chunks.push(c);
    total += c.ids.length + 2;
    onProgress?.(i + 1);
  }
  const tokens = new Int32Array(total);
  const mask = new Uint8Array(total);
  const starts = new Int32Array(chunks.length);
  let p = 0;
  chunks.forEach((c, i) => {
    starts[i] = p;
    tokens[p++] = tok.bos;
    tokens.set(c.ids, p);
    mask.set(c.train, p);
    p += c.ids.length;
    tokens[p] = tok.eos;
    // EOS is learnt when the example ends in a trained part (so the model learns to stop after a response).
    mask[p] = c.train.length > 0 ? c.train[c.train.length - 1] : 0;
    p++;
  });
  return { tokens, mask, starts };
}

/** Adapts a runtime tokenizer (runtime/tokenizer) to the data pipeline; `fingerprint` should identify its file. */
export function dataTokenizer(
  tok: { encode(text: string, opts?: { bos?: boolean; eos?: boolean }): number[]; bos: number; eos: number; vocabSize: number },
  fingerprint: string,
): DataTokenizer {
  return { encode: (t) => tok.encode(t, { bos: false, eos: false }), bos: tok.bos, eos: tok.eos, fingerprint };
}
