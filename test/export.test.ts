// GGUF export: a merged 4-bit g32 stories260K becomes Q4_1 blocks (down, with in = 172, exact F32), reads back
// with our GGUF reader to the same weights within the reported fp16 error, loads in llama.cpp
// (node-llama-cpp 3.21.1, CPU), and llama.cpp's greedy continuation equals ours.
import { join } from 'node:path';
import type { Llama } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mergeModel } from '../runtime/cli/merge.ts';
import { buildGguf, denseWeight, vocabFromTokenizer, writeGgufModel } from '../runtime/export/gguf.ts';
import { readGguf } from '../runtime/formats/gguf.ts';
import { ggufToLlama } from '../runtime/formats/gguf-llama.ts';
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { LlamaWeights } from '../runtime/model/types.ts';
import type { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { openForRun } from '../runtime/train/setup.ts';
import { fixture, needs } from './fixtures.ts';
import { cpuLlama, expectSameGreedy, llamaCppGreedy } from './llama-cpp.ts';
import { STORIES, TOK, trainStories, type TrainedStories } from './train-fixture.ts';
import { denseTable, readAllFloat } from '../runtime/model/dense.ts';

describe('GGUF export', () => {
  let t: TrainedStories;
  let merged: LlamaWeights;
  let mergedModel: LlamaModel;
  let llama: Llama;
  let path: string;
  beforeAll(async () => {
    t = await trainStories(10);
    merged = (await mergeModel(t.model)).weights;
    mergedModel = await LlamaModel.create(merged, { backend: 'cpu', spec: t.spec, adapters: merged.blocks.map(() => ({})) });
    path = join(t.dir, 'merged.gguf');
    llama = await cpuLlama();
  });
  afterAll(async () => {
    await llama?.dispose();
  });

  it('writes Q4_1 blocks (d = α, m = β) that read back to the merged weights', () => {
    const r = writeGgufModel(path, merged, vocabFromTokenizer(t.tokenizer as SentencePieceBpe), { name: 'stories260k-qalora' });
    const f = readGguf(path);
    expect(f.version).toBe(3);
    expect(f.metadata.get('general.architecture')!.value).toBe('llama');
    expect(f.metadata.get('general.quantization_version')!.value).toBe(2);
    expect(f.tensors.get('blk.0.attn_q.weight')!.type).toBe(GgmlType.Q4_1);
    expect(f.tensors.get('blk.4.ffn_up.weight')!.type).toBe(GgmlType.Q4_1);
    expect(f.tensors.get('blk.0.ffn_down.weight')!.type).toBe(GgmlType.F32); // in = 172: no 32-blocks
    expect(f.tensors.has('output.weight')).toBe(false); // tied classifier
    // An independent decode (the GGUF reader's dequantizer) gives our weights up to the fp16 rounding reported.
    const back = readAllFloat(ggufToLlama(f));
    expect(r.maxAbsError).toBeGreaterThan(0);
    expect(r.maxAbsError).toBeLessThan(5e-3);
    for (let l = 0; l < merged.config.layers; l++) {
      for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
        const ours = denseWeight(merged.blocks[l].proj[p]);
        const theirs = (back.blocks[l].proj[p] as { w: Float32Array }).w;
        let e = 0;
        for (let i = 0; i < ours.length; i++) e = Math.max(e, Math.abs(ours[i] - theirs[i]));
        expect(e).toBeLessThanOrEqual(r.maxAbsError * (1 + 1e-6));
        if (p === 'down') expect(e).toBe(0);
      }
    }
    expect(Array.from(denseTable(back.tokEmbedding).subarray(0, 64))).toEqual(Array.from(denseTable(merged.tokEmbedding).subarray(0, 64)));
  });

  it('loads in llama.cpp, whose greedy continuation equals ours token for token', async () => {
    const prompt = t.tokenizer.encode('Once upon a time', { bos: true });
    const theirs = await llamaCppGreedy(llama, path, prompt, 64, {
      // llama.cpp tokenizes with the vocabulary we wrote exactly as our tokenizer does.
      inspect: (m) => expect(m.tokenize('Once upon a time')).toEqual(t.tokenizer.encode('Once upon a time')),
    });
    expectSameGreedy(mergedModel, prompt, theirs);
  });

  it('exports a float model as F32 that llama.cpp runs like llama2.c (golden)', needs('golden/stories260K_prompt_once_n64.txt'), async () => {
    const { readFileSync } = await import('node:fs');
    const opened = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK) });
    const fpath = join(t.dir, 'float.gguf');
    const r = writeGgufModel(fpath, opened.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe));
    expect(r.maxAbsError).toBe(0);
    expect(r.tensors.every((x) => x.type === 'F32')).toBe(true);
    expect(() => buildGguf(opened.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe), { floatType: 'f16' })).toThrow(/--lossy/);
    const model = await llama.loadModel({ modelPath: fpath });
    const ctx = await model.createContext({ contextSize: 128, threads: 1 } as never);
    try {
      const prompt = opened.tokenizer.encode('Once upon a time', { bos: true });
      const out: number[] = [...prompt];
      for await (const tok of ctx.getSequence().evaluate(prompt as never, { temperature: 0 } as never)) {
        out.push(tok as number);
        if (out.length >= 64) break;
      }
      const golden = readFileSync(fixture('golden/stories260K_prompt_once_n64.txt'), 'utf8');
      const text = opened.tokenizer.decode(out);
      expect(golden.startsWith(text.slice(0, 120))).toBe(true);
    } finally {
      await ctx.dispose();
      await model.dispose();
    }
  });
});
