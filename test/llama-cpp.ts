// llama.cpp (node-llama-cpp 3.21.1, its prebuilt CPU library) as the oracle of the GGUF export tests: its greedy
// continuation of a prompt, with LoRA adapter files applied or not, and the check that it is ours.
import { getLlama, type Llama, type LlamaModel as LlamaCppModel } from 'node-llama-cpp';
import { expect } from 'vitest';
import type { LlamaModel } from '../runtime/model/llama.ts';

export function cpuLlama(): Promise<Llama> {
  return getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
}

export function argmax(a: Float32Array): number {
  let b = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[b]) b = i;
  return b;
}

/** llama.cpp's first `n` greedy tokens after `prompt` (ids, BOS included), `lora` adapter files applied at scale 1. */
export async function llamaCppGreedy(
  llama: Llama, modelPath: string, prompt: number[], n: number,
  opts: { lora?: string[]; inspect?: (model: LlamaCppModel) => void } = {},
): Promise<number[]> {
  const model = await llama.loadModel({ modelPath });
  try {
    opts.inspect?.(model);
    const lora = opts.lora?.length ? { adapters: opts.lora.map((filePath) => ({ filePath })) } : undefined;
    const ctx = await model.createContext({ contextSize: 256, threads: 1, lora } as never);
    try {
      const out: number[] = [];
      for await (const tok of ctx.getSequence().evaluate(prompt as never, { temperature: 0 } as never)) {
        out.push(tok as number);
        if (out.length >= n) break;
      }
      return out;
    } finally {
      await ctx.dispose();
    }
  } finally {
    await model.dispose();
  }
}

/**
 * llama.cpp's greedy tokens are ours: our free-running greedy equals theirs for `strict` tokens or until a
 * near-tie, and teacher-forced over all of them each is our argmax or a near-tie (llama.cpp rounds activations
 * to 8 bits in its Q4_1 dot products, and the file's fp16 d and m shift logits by ~1e-2 at most). Returns the
 * number of near-ties.
 */
export function expectSameGreedy(ours: LlamaModel, prompt: number[], theirs: number[], opts: { strict?: number; gap?: number; maxTies?: number } = {}): number {
  const { strict = 16, gap = 0.05, maxTies = 3 } = opts;
  const s = ours.newSession();
  let logits = s.prefill(prompt);
  for (let i = 0; i < strict; i++) {
    const best = argmax(logits);
    if (best !== theirs[i]) {
      // Same context so far: they may differ only where our top two are within `gap`.
      expect(logits[best] - logits[theirs[i]], `free-running token ${i}`).toBeLessThan(gap);
      break;
    }
    logits = s.step(best);
  }
  const tf = ours.newSession();
  logits = tf.prefill(prompt);
  let ties = 0;
  for (const tok of theirs) {
    const best = argmax(logits);
    if (best !== tok) {
      ties++;
      expect(logits[best] - logits[tok]).toBeLessThan(gap);
    }
    logits = tf.step(tok);
  }
  expect(ties).toBeLessThanOrEqual(maxTies);
  return ties;
}
