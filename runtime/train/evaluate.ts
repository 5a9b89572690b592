// Held-out evaluation: mean next-token cross-entropy over counted targets, perplexity = exp(mean CE).
import type { PackedWindows } from '../data/dataset.ts';
import type { BackendTraining } from '../model/llama.ts';
import type { AdapterSet } from '../model/types.ts';

/** The part of a model evaluation and training need (LlamaModel satisfies it; tests may use a toy). */
export interface TrainModel {
  adapters: AdapterSet;
  /** Sum of cross-entropy over unmasked targets and how many there were. */
  loss(tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts?: { mask?: Uint8Array }): { loss: number; count: number };
  /** The same sum and its gradient w.r.t. every adapter (buffers may be reused by the next call). */
  lossAndGrad(
    tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number,
    opts?: { mask?: Uint8Array; training?: boolean; seed?: number },
  ): { loss: number; count: number; grads: AdapterSet };
  /** Training whose state stays on a GPU backend; absent or undefined: the host trains (LlamaModel.trainingOnBackend). */
  trainingOnBackend?(): BackendTraining | undefined;
}

export interface EvalResult {
  loss: number;
  perplexity: number;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
}

/** Evaluates windows [0, maxWindows) in batches of `batchSize` (0 or undefined: all windows). */
export function evaluateWindows(
  model: Pick<TrainModel, 'loss'>,
  windows: PackedWindows,
  batchSize: number,
  maxWindows = 0,
  onProgress?: (done: number, total: number) => void,
): EvalResult {
  const n = maxWindows > 0 ? Math.min(maxWindows, windows.count) : windows.count;
  const t0 = performance.now();
  let sum = 0, count = 0, positions = 0;
  for (let i = 0; i < n; i += batchSize) {
    const idx = [];
    for (let k = i; k < Math.min(n, i + batchSize); k++) idx.push(k);
    const b = windows.batch(idx);
    if (b.count === 0) continue;
    const r = model.loss(b.tokens, b.targets, b.batch, b.seqLen, { mask: b.mask });
    sum += r.loss;
    count += r.count;
    positions += b.batch * b.seqLen;
    onProgress?.(Math.min(n, i + batchSize), n);
  }
  const seconds = (performance.now() - t0) / 1000;
  const loss = count > 0 ? sum / count : NaN;
  return { loss, perplexity: Math.exp(loss), tokens: count, seconds, tokensPerSecond: seconds > 0 ? positions / seconds : 0 };
}
