// Merge: the merged INT4 model's logits equal the unmerged model's (base + adapter) within float rounding on
// real text; q and α are bit-identical to the base's after a save/reload; the native merge kernel agrees with
// the float64 reference.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { mergeModel, saveMerged } from '../runtime/cli/merge.ts';
import { mergeAdapters, referenceMerger } from '../runtime/merge.ts';
import { loadQuantizedBase, saveQuantizedBase } from '../runtime/model/basefile.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { QuantLinear } from '../runtime/model/types.ts';
import { openForRun } from '../runtime/train/setup.ts';
import { fixture, needs } from './fixtures.ts';
import { STORIES, TOK, trainStories, type TrainedStories } from './train-fixture.ts';

describe('merge (stories260K, INT4, trained adapter)', () => {
  let t: TrainedStories;
  beforeAll(async () => {
    t = await trainStories(10);
  });

  it('merged logits equal base + adapter logits within float rounding on real text', needs('data/tinystories/tinystories-5-stories.txt'), async () => {
    const { weights, report } = await mergeModel(t.model);
    expect(report.quant).toBe(35);
    expect(report.maxShift).toBeGreaterThan(1e-4); // the adapter really moved the offsets
    const merged = await LlamaModel.create(weights, { backend: 'cpu', spec: t.spec, adapters: t.model.adapters.map(() => ({})) });
    const text = readFileSync(fixture('data/tinystories/tinystories-5-stories.txt'), 'utf8').split('<|endoftext|>')[0];
    const ids = t.tokenizer.encode(text.trim(), { bos: true }).slice(0, 200);
    const tokens = Int32Array.from(ids);
    const a = t.model.logits(tokens, 1, ids.length);
    const b = merged.logits(tokens, 1, ids.length);
    let maxDiff = 0, maxAbs = 0;
    for (let i = 0; i < a.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(a[i] - b[i]));
      maxAbs = Math.max(maxAbs, Math.abs(a[i]));
    }
    expect(maxDiff / maxAbs).toBeLessThan(2e-5);
    // And the adapter matters: the base alone differs by far more than rounding.
    const base = await LlamaModel.create(t.model.weights, { backend: 'cpu', spec: t.spec, adapters: t.model.adapters.map(() => ({})) });
    const c = base.logits(tokens, 1, ids.length);
    let baseDiff = 0;
    for (let i = 0; i < a.length; i++) baseDiff = Math.max(baseDiff, Math.abs(a[i] - c[i]));
    expect(baseDiff).toBeGreaterThan(100 * maxDiff);
  });

  it('keeps q and α bit-identical through save and reload, and matches the float64 reference merge', async () => {
    const { weights } = await mergeModel(t.model);
    const basePath = join(t.dir, 'base.safetensors'), mergedPath = join(t.dir, 'merged.safetensors');
    saveQuantizedBase(basePath, t.model.weights);
    saveMerged(mergedPath, weights, t.model, fixture(TOK));
    const base = loadQuantizedBase(basePath).weights, merged = loadQuantizedBase(mergedPath).weights;
    const ref = mergeAdapters(t.model.weights, t.model.adapters, referenceMerger).weights;
    let betaChanged = 0;
    base.blocks.forEach((b, l) => {
      for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
        const x = b.proj[p] as QuantLinear, y = merged.blocks[l].proj[p] as QuantLinear, r = ref.blocks[l].proj[p] as QuantLinear;
        expect(Buffer.from(y.qweight.buffer, y.qweight.byteOffset, y.qweight.byteLength).equals(Buffer.from(x.qweight.buffer, x.qweight.byteOffset, x.qweight.byteLength))).toBe(true);
        expect(Buffer.from(y.alpha.buffer, y.alpha.byteOffset, y.alpha.byteLength).equals(Buffer.from(x.alpha.buffer, x.alpha.byteOffset, x.alpha.byteLength))).toBe(true);
        for (let i = 0; i < y.beta.length; i++) {
          expect(Math.abs(y.beta[i] - r.beta[i])).toBeLessThanOrEqual(1e-6 * Math.max(1, Math.abs(r.beta[i])));
          if (y.beta[i] !== x.beta[i]) betaChanged++;
        }
      }
    });
    expect(betaChanged).toBeGreaterThan(0);
    // The merged file reopens by itself: spec and tokenizer are recorded in it.
    const reopened = await openForRun({ model: mergedPath });
    expect(reopened.tokenizer.encode('Once upon a time', { bos: true })).toEqual([1, 403, 407, 261, 378]);
    expect(reopened.model.spec?.layers.length).toBe(t.spec.layers.length);
  });

  it('refuses to merge a plain LoRA adapter into an INT-b layer', () => {
    const lin = t.model.weights.blocks[0].proj.q as QuantLinear;
    const bad = [{ q: { rank: 2, alpha: 4, a: new Float32Array(2 * lin.in), b: new Float32Array(lin.out * 2) } }];
    expect(() => mergeAdapters(t.model.weights, bad)).toThrow(/block 0 q_proj: adapter A has 64 columns.*plain LoRA adapter cannot merge into an INT-b base exactly/);
  });
});
