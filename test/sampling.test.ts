import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { argmax, Sampler, sampleTopP, softmaxF32, StopStrings, XorShift64Star } from '../runtime/sampling.ts';

/** llama2.c's random_u32, transcribed with BigInt as the independent reference. */
function* llama2cRng(seed: bigint) {
  const M = (1n << 64n) - 1n;
  let s = seed;
  for (;;) {
    s ^= s >> 12n;
    s = (s ^ (s << 25n)) & M;
    s ^= s >> 27n;
    yield Number(((s * 0x2545f4914f6cdd1dn) & M) >> 32n);
  }
}

const logitsOf = (probs: number[]) => Float32Array.from(probs, Math.log);

/** Empirical frequencies of `n` draws. */
function frequencies(s: Sampler, logits: Float32Array, n: number, history: number[] = []): number[] {
  const counts = new Array(logits.length).fill(0);
  for (let i = 0; i < n; i++) counts[s.sample(logits, history)]++;
  return counts.map((c) => c / n);
}

describe('sampling', () => {
  it('xorshift64* matches a BigInt transcription of llama2.c for several seeds', () => {
    for (const seed of [1, 42, 1234567890123, 2 ** 53 - 1]) {
      const ref = llama2cRng(BigInt(seed));
      const rng = new XorShift64Star(seed);
      for (let i = 0; i < 1000; i++) expect(rng.nextU32()).toBe(ref.next().value);
    }
  });

  it('greedy is argmax with ties to the lowest id; temperature 0 ignores top-k/top-p', () => {
    expect(argmax([1, 3, 3, 2])).toBe(1);
    const s = new Sampler(4, { temperature: 0, topK: 1, topP: 0.5, seed: 1 });
    expect(s.sample([0.5, 2, 2, -1])).toBe(1);
    expect(s.sample(Float32Array.of(-5, -4, -3, -3.5))).toBe(2);
  });

  it('temperature 1 samples the softmax distribution; temperature 2 flattens it as softmax(x/2)', () => {
    const p = [0.5, 0.25, 0.15, 0.1];
    const f = frequencies(new Sampler(4, { temperature: 1, topP: 0, seed: 7 }), logitsOf(p), 40000);
    f.forEach((x, i) => expect(Math.abs(x - p[i])).toBeLessThan(0.01));
    const t2 = p.map(Math.sqrt);
    const z = t2.reduce((a, b) => a + b);
    const f2 = frequencies(new Sampler(4, { temperature: 2, topP: 0, seed: 8 }), logitsOf(p), 40000);
    f2.forEach((x, i) => expect(Math.abs(x - t2[i] / z)).toBeLessThan(0.01));
  });

  it('top-p keeps the smallest prefix whose mass exceeds p, renormalised (llama2.c rule)', () => {
    const p = [0.05, 0.4, 0.3, 0.2, 0.05];
    // sorted: 0.4, 0.3, 0.2 → cumulative 0.9 > 0.85 at the third: nucleus {1, 2, 3}
    const f = frequencies(new Sampler(5, { temperature: 1, topP: 0.85, seed: 3 }), logitsOf(p), 30000);
    expect(f[0]).toBe(0);
    expect(f[4]).toBe(0);
    [[1, 0.4], [2, 0.3], [3, 0.2]].forEach(([i, q]) => expect(Math.abs(f[i] - q / 0.9)).toBeLessThan(0.012));
    // the coin is scaled by the nucleus mass: coin 0 → most likely, coin just below 1 → last in the nucleus
    const probs = softmaxF32(logitsOf(p));
    expect(sampleTopP(probs, 0.85, 0)).toBe(1);
    expect(sampleTopP(probs, 0.85, 0.999)).toBe(3);
  });

  it('top-k keeps exactly the k most likely tokens', () => {
    const p = [0.1, 0.3, 0.05, 0.35, 0.2];
    const f = frequencies(new Sampler(5, { temperature: 1, topK: 2, topP: 0, seed: 11 }), logitsOf(p), 20000);
    expect(f[0] + f[2] + f[4]).toBe(0);
    expect(Math.abs(f[3] - 0.35 / 0.65)).toBeLessThan(0.015);
  });

  it('repetition penalty divides positive and multiplies negative logits of seen tokens', () => {
    const s = new Sampler(3, { temperature: 0, repetitionPenalty: 2 });
    expect(s.sample([3, 2, -1])).toBe(0);
    expect(s.sample([3, 2, -1], [0])).toBe(1); // 3/2 = 1.5 < 2
    expect(s.sample([-1, -1.5, -4])).toBe(0);
    expect(s.sample([-1, -1.5, -4], [0, 0])).toBe(1); // -1·2 = -2 < -1.5; a repeated id counts once
    const w = new Sampler(3, { temperature: 0, repetitionPenalty: 2, repetitionWindow: 1 });
    expect(w.sample([3, 2, -1], [0, 2])).toBe(0); // 0 is outside the window
  });

  it('a seed reproduces a sequence; another seed changes it', () => {
    const logits = Float32Array.from({ length: 50 }, (_, i) => Math.sin(i) * 2);
    const run = (seed: number) => { const s = new Sampler(50, { temperature: 0.9, topP: 0.9, seed }); return Array.from({ length: 40 }, () => s.sample(logits)); };
    expect(run(5)).toEqual(run(5));
    expect(run(5)).not.toEqual(run(6));
  });

  it('rejects bad options with a clear error', () => {
    expect(() => new Sampler(4, { temperature: -1 })).toThrow(QaloraError);
    expect(() => new Sampler(4, { topK: 1.5 })).toThrow(/top-k/);
    expect(() => new Sampler(4, { repetitionPenalty: 0 })).toThrow(/repetition penalty/);
    expect(() => new Sampler(4, { seed: -3 })).toThrow(/seed/);
    expect(() => new Sampler(4).sample([1, 2])).toThrow(/2 logits for a vocabulary of 4/);
  });

  it('stop strings: cut at the earliest, never print a partial stop string, flush the rest', () => {
    const s = new StopStrings(['\n\nUser:', 'END']);
    const outs = ['Hello', ' world\n', '\nUs', 'er: more'].map((t) => s.push(t));
    expect(outs.map((o) => o.text).join('')).toBe('Hello world');
    expect(outs.at(-1)!.stop).toBe(true);
    expect(outs[2].text).toBe(''); // "\n\nUs" could still become the stop string
    const t = new StopStrings(['END']);
    expect(t.push('the EN').text).toBe('the ');
    expect(t.push('Dless')).toEqual({ text: '', stop: true }); // "ENDless" completes END across tokens
    expect(t.push('more')).toEqual({ text: '', stop: true });
    const u = new StopStrings(['END']);
    expect(u.push('fin E').text).toBe('fin ');
    expect(u.flush()).toBe('E');
    expect(() => new StopStrings([''])).toThrow(QaloraError);
  });
});
