// Log-probabilities of sampled tokens and their most likely alternatives, from the raw logits (the model's
// distribution at temperature 1, as OpenAI and vLLM report them). One pass for the log-sum-exp, one for the top k.
import type { Tokenizer } from '../tokenizer/types.ts';

export interface TokenLogprob {
  id: number;
  token: string;
  logprob: number;
  bytes: number[];
  top: Array<{ id: number; token: string; logprob: number; bytes: number[] }>;
}

function logSumExp(x: Float32Array): number {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i] > max) max = x[i];
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i] - max);
  return max + Math.log(sum);
}

/** Indices of the k largest values, largest first (ties: lower index first). */
export function topIndices(x: Float32Array, k: number): number[] {
  const best: number[] = [];
  for (let i = 0; i < x.length; i++) {
    if (best.length === k && x[i] <= x[best[k - 1]]) continue;
    let j = best.length === k ? k - 1 : best.length;
    while (j > 0 && x[best[j - 1]] < x[i]) {
      best[j] = best[j - 1];
      j--;
    }
    best[j] = i;
  }
  return best.slice(0, k);
}

function piece(tok: Tokenizer, prev: number, id: number): { token: string; bytes: number[] } {
  const bytes = tok.pieceBytes ? [...tok.pieceBytes(prev, id)] : [...Buffer.from(tok.decodeToken(prev, id), 'utf8')];
  return { token: tok.decodeToken(prev, id), bytes };
}

export function topLogprobs(logits: Float32Array, id: number, k: number, tok: Tokenizer, prev: number): TokenLogprob {
  const lse = logSumExp(logits);
  const top = k > 0 ? topIndices(logits, k).map((i) => ({ id: i, ...piece(tok, prev, i), logprob: logits[i] - lse })) : [];
  return { id, ...piece(tok, prev, id), logprob: logits[id] - lse, top };
}
