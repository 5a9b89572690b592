// A shortened `qalora demo`: every stage runs, the loss falls, the merged INT4 model's held-out perplexity
// equals the adapter's (the merge is exact) and beats the untuned INT4 base, and a sample comes out.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runDemo } from '../runtime/cli/demo.ts';
import { fixture, repoRoot } from './fixtures.ts';

const out = mkdtempSync(join(tmpdir(), 'qalora-demo-'));
afterAll(() => rmSync(out, { recursive: true, force: true }));

describe('qalora demo (shortened)', () => {
  it('quantizes, fine-tunes, merges, evaluates and samples', async () => {
    const lines: string[] = [];
    const r = await runDemo({
      model: fixture('models/stories260K/stories260K.bin'), spec: join(repoRoot, 'specs/stories260k.qal'),
      data: fixture('data/shakespeare/tinyshakespeare.txt'), dataChars: 30_000, out, steps: 12, batchSize: 4, seqLen: 64,
      lr: 3e-3, seed: 7, evalWindows: 8, prompt: 'ROMEO:', sampleTokens: 24, quiet: true, write: (s) => lines.push(s),
    });
    // Held-out loss (evaluated at steps 0, 3, 6, 9, 12) falls; single-batch training losses are too noisy to rank.
    expect(r.valLosses.length).toBe(5);
    expect(r.valLosses[4]).toBeLessThan(r.valLosses[0]);
    expect(r.losses.length).toBe(12);
    expect(r.mergedPerplexity).toBeLessThan(r.basePerplexity);
    expect(Math.abs(r.mergedPerplexity - r.adapterPerplexity) / r.adapterPerplexity).toBeLessThan(1e-4);
    expect(r.sample.startsWith('ROMEO:')).toBe(true);
    expect(r.sample.length).toBeGreaterThan('ROMEO:'.length);
    const text = lines.join('\n');
    expect(text).toMatch(/held-out perplexity: INT4 base [\d.]+ → merged INT4 [\d.]+/);
    expect(text).toContain('6/6 sampling');
  });
});
