// A QA-LoRA adapter exported as a plain LoRA: trained briefly on stories260K (mean and sum pooling; down has group
// 43), expanded to PEFT and llama.cpp LoRA GGUF, read back as plain LoRA and folded onto the same INT4 base, it
// gives the unmerged model's logits within float rounding; llama.cpp running the GGUF base plus the GGUF LoRA
// continues greedily as we do (stories260K and aidreams260K); bad input is refused naming the tensor.
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Llama } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openAdapterFor } from '../runtime/adapters/open.ts';
import { loadPeftAdapter, savePeftAdapter, type LoadedAdapter } from '../runtime/adapters/peft.ts';
import { readGgufLora } from '../runtime/adapters/gguf-lora.ts';
import { vocabFromTokenizer, writeGgufModel } from '../runtime/export/gguf.ts';
import { exportLora } from '../runtime/export/lora.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { Adapter, AdapterSet } from '../runtime/model/types.ts';
import { createQaloraServer } from '../runtime/serve/load.ts';
import type { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { openForRun } from '../runtime/train/setup.ts';
import { fixture, needs, repoRoot } from './fixtures.ts';
import { cpuLlama, expectSameGreedy, llamaCppGreedy } from './llama-cpp.ts';
import { STORIES, storiesSpec, TOK, trainStories, type TrainedStories } from './train-fixture.ts';

const AIDREAMS = 'models/aidreams260K/aidreams260K.bin';
const AIDREAMS_TOK = 'models/aidreams260K/tok512.bin';
const SPEC = join(repoRoot, 'specs/stories260k.qal');

let llama: Llama;
beforeAll(async () => {
  llama = await cpuLlama();
});
afterAll(async () => {
  await llama?.dispose();
});

/** Largest |x − y| over the largest |y|. */
function relDiff(x: Float32Array, y: Float32Array): number {
  let d = 0, m = 0;
  for (let i = 0; i < y.length; i++) {
    d = Math.max(d, Math.abs(x[i] - y[i]));
    m = Math.max(m, Math.abs(y[i]));
  }
  return d / m;
}

/** Largest relative difference of s·A and of B between two adapter sets (a GGUF may move alpha/rank into A). */
function maxAdapterRelDiff(a: AdapterSet, b: AdapterSet): number {
  const scaledA = (ad: Adapter) => ad.a.map((v) => (v * ad.alpha) / ad.rank);
  let worst = 0;
  b.forEach((block, l) => {
    for (const [p, ad] of Object.entries(block)) {
      const other = a[l][p as keyof typeof block]!;
      expect(other.rank).toBe(ad!.rank);
      worst = Math.max(worst, relDiff(scaledA(other), scaledA(ad!)), relDiff(other.b, ad!.b));
    }
  });
  return worst;
}

/** The adapter as a user has it: the PEFT directory training writes. */
function savedAdapter(t: TrainedStories, dir: string): LoadedAdapter {
  const layers = t.spec.layers.filter((l) => l.projection);
  savePeftAdapter(dir, t.model.adapters, {
    kind: 'qalora', groups: Object.fromEntries(layers.map((l) => [l.projection!, l.group])), pool: layers[0].pool, dropout: 0.05, bits: 4,
  });
  return loadPeftAdapter(dir, { model: t.model.config });
}

/** A window of real text, and the unmerged model's logits on it. */
function logitsOn(model: LlamaModel, t: TrainedStories): Float32Array {
  const ids = t.tokenizer.encode(readFileSync(t.dataFile, 'utf8').slice(0, 400), { bos: true }).slice(0, 48);
  return model.logits(Int32Array.from(ids), 1, ids.length);
}

for (const pool of ['mean', 'sum'] as const) {
  describe(`plain LoRA export of a QA-LoRA adapter (${pool} pooling, stories260K)`, () => {
    let t: TrainedStories;
    let src: LoadedAdapter;
    let dir: string;
    beforeAll(async () => {
      dir = mkdtempSync(join(tmpdir(), `qalora-lora-${pool}-`));
      // The sum variant is its own spec (and addon); CUDA targets dropped, the CPU is what runs here.
      const spec = pool === 'mean' ? storiesSpec() : storiesSpec(dir, (s) => s.replace('model stories260k', 'model stories260k_sum').replace('pool mean', 'pool sum').replace(/^\s*target cuda.*$/m, ''));
      t = await trainStories(8, { dir, spec });
      src = savedAdapter(t, join(dir, 'qalora'));
    });

    it('PEFT plain LoRA (A [r, in]) read back and folded gives the unmerged logits within float rounding', async () => {
      const out = join(dir, 'plain');
      const r = exportLora('lora', out, src, { model: t.model.config });
      expect(r.maxAbsError).toBe(0);
      const cfg = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
      expect(cfg).toMatchObject({ peft_type: 'LORA', use_qalora: false, r: 2, lora_alpha: 4, alpha_pattern: { down_proj: 8 }, rank_pattern: { down_proj: 4 } });
      expect(cfg.target_modules).toEqual(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
      const plain = loadPeftAdapter(out, { model: t.model.config });
      expect(plain.kind).toBe('lora');
      expect(plain.adapters[0].down!.a.length).toBe(4 * 172); // [r, in]: 43 repeats of each of 4 columns
      // Folded back onto the same INT4 base: the QA-LoRA adapter again (A up to the rounding of c·A·(1/c)).
      const folded = openAdapterFor(out, t.model.weights);
      expect(folded.folded).toBe(true);
      expect(maxAdapterRelDiff(folded.adapters, t.model.adapters)).toBeLessThan(1e-6);
      const viaPlain = await LlamaModel.create(t.model.weights, { backend: 'cpu', spec: t.spec, adapters: folded.adapters });
      const ref = logitsOn(t.model, t);
      const err = relDiff(logitsOn(viaPlain, t), ref);
      console.log(`${pool} pooling, F32 plain LoRA folded back: logits relative difference ${err.toExponential(3)}`);
      expect(err).toBeLessThan(1e-5);
      // The adapter matters at all (else the comparison above proves nothing).
      const base = await LlamaModel.create(t.model.weights, { backend: 'cpu', spec: t.spec, adapters: t.model.adapters.map(() => ({})) });
      expect(relDiff(logitsOn(base, t), ref)).toBeGreaterThan(1e-3);
    });

    it('F16/BF16 on request (--lossy), with the error reported and seen in the logits', async () => {
      expect(() => exportLora('lora', join(dir, 'f16-refused'), src, { model: t.model.config, dtype: 'f16' })).toThrow(/--lossy/);
      const ref = logitsOn(t.model, t);
      for (const dtype of ['f16', 'bf16'] as const) {
        const out = join(dir, dtype);
        const r = exportLora('lora', out, src, { model: t.model.config, dtype, lossy: true });
        expect(r.summary).toMatch(new RegExp(`${dtype} rounding moves s·B·A′ by at most`));
        expect(r.maxRelError).toBeGreaterThan(0);
        expect(r.maxRelError).toBeLessThan(dtype === 'f16' ? 2e-3 : 1e-2);
        const model = await LlamaModel.create(t.model.weights, { backend: 'cpu', spec: t.spec, adapters: openAdapterFor(out, t.model.weights).adapters });
        const logitErr = relDiff(logitsOn(model, t), ref);
        console.log(`${pool} pooling, ${dtype} plain LoRA: s·B·A′ max abs error ${r.maxAbsError.toExponential(3)}, relative ${r.maxRelError.toExponential(3)}; logits relative ${logitErr.toExponential(3)}`);
        expect(logitErr).toBeLessThan(dtype === 'f16' ? 1e-3 : 1e-2);
      }
    });

    it('GGUF base (unmerged) + GGUF LoRA in llama.cpp continue greedily as our unmerged model', async () => {
      const basePath = join(dir, 'base.gguf'), loraPath = join(dir, 'adapter.gguf');
      writeGgufModel(basePath, t.model.weights, vocabFromTokenizer(t.tokenizer as SentencePieceBpe));
      const r = exportLora('gguf-lora', loraPath, src);
      expect(r.summary).toMatch(/adapter\.lora\.alpha 4/);
      expect(r.summary).toMatch(/folded into lora_a .*: down_proj \(alpha 8\)$/m); // one alpha per file: down's 8/4 folded into lora_a
      // Our reader folds it back to the same adapter (the alpha ratio 2 is exact).
      expect(maxAdapterRelDiff(openAdapterFor(loraPath, t.model.weights).adapters, t.model.adapters)).toBeLessThan(1e-6);
      // A line of the fine-tuning text, where the adapter moves the greedy continuation most.
      const prompt = t.tokenizer.encode('First Citizen:\nBefore we proceed any further, hear me speak.', { bos: true });
      const theirs = await llamaCppGreedy(llama, basePath, prompt, 64, { lora: [loraPath] });
      console.log(`${pool} pooling, llama.cpp base + LoRA: ${expectSameGreedy(t.model, prompt, theirs)} near-ties in 64 tokens`);
      const withoutLora = await llamaCppGreedy(llama, basePath, prompt, 64);
      expect(withoutLora).not.toEqual(theirs);
      // F16 tensors (what llama.cpp's own converter writes by default) run too, within the same near-ties.
      const f16Path = join(dir, 'adapter-f16.gguf');
      exportLora('gguf-lora', f16Path, src, { dtype: 'f16', lossy: true });
      expectSameGreedy(t.model, prompt, await llamaCppGreedy(llama, basePath, prompt, 64, { lora: [f16Path] }));
    });
  });
}

describe('plain LoRA on aidreams260K (nothing hard-coded to stories260K)', needs(AIDREAMS, AIDREAMS_TOK), () => {
  it('GGUF base + GGUF LoRA in llama.cpp continue greedily as our unmerged model; PEFT round trip folds back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-lora-aidreams-'));
    const spec = storiesSpec(dir, (s) => s.replace('model stories260k', 'model aidreams260k').replace(/llama \{[^}]*\}/, 'llama { dim 64  hidden 172  layers 4  heads 4  kv_heads 4  vocab 512  context 128 }').replace(/^\s*target cuda.*$/m, ''));
    const { model, tokenizer } = await openForRun({ model: fixture(AIDREAMS), tokenizer: fixture(AIDREAMS_TOK), spec, backend: 'cpu', seed: 3 });
    // An adapter far from its zero-B start without a training run: B from a fixed LCG.
    let state = 777;
    const next = () => ((state = (Math.imul(state, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
    for (const block of model.adapters) for (const ad of Object.values(block)) for (let i = 0; i < ad!.b.length; i++) ad!.b[i] = 0.5 * next();
    savePeftAdapter(join(dir, 'qalora'), model.adapters, { kind: 'qalora', groups: { q: 32, k: 32, v: 32, o: 32, gate: 32, up: 32, down: 43 }, pool: 'mean', dropout: 0 });
    const src = loadPeftAdapter(join(dir, 'qalora'), { model: model.config });

    exportLora('lora', join(dir, 'plain'), src, { model: model.config });
    expect(maxAdapterRelDiff(openAdapterFor(join(dir, 'plain'), model.weights).adapters, model.adapters)).toBeLessThan(1e-6);

    const basePath = join(dir, 'base.gguf'), loraPath = join(dir, 'adapter.gguf');
    writeGgufModel(basePath, model.weights, vocabFromTokenizer(tokenizer as SentencePieceBpe));
    exportLora('gguf-lora', loraPath, src);
    const prompt = tokenizer.encode('Echoes of vectors', { bos: true });
    const theirs = await llamaCppGreedy(llama, basePath, prompt, 64, { lora: [loraPath] });
    console.log(`aidreams260K, llama.cpp base + LoRA: ${expectSameGreedy(model, prompt, theirs)} near-ties in 64 tokens`);
    expect(await llamaCppGreedy(llama, basePath, prompt, 64)).not.toEqual(theirs);

    // Bad input: this adapter on stories260K (k/v have 64 outputs here, 32 there) is refused naming the tensor.
    const stories = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: storiesSpec(), backend: 'cpu' });
    expect(() => openAdapterFor(loraPath, stories.model.weights)).toThrow(/adapter\.gguf: tensor 'blk\.0\.attn_k\.weight\.lora_b' has 64 outputs \(dims \[2,64\]\), the base's attn_k has 32/);
    expect(() => openAdapterFor(join(dir, 'plain'), stories.model.weights)).toThrow(/'base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight'.*lora_B has 64 rows but k_proj has 32 outputs/);
  });
});

describe('plain LoRA: what cannot be applied is refused naming the tensor', () => {
  let opened: Awaited<ReturnType<typeof openForRun>>;
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qalora-lora-bad-'));
    opened = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: storiesSpec(), backend: 'cpu', seed: 1 });
  });

  it('a model GGUF passed as an adapter', async () => {
    const basePath = join(dir, 'base.gguf');
    writeGgufModel(basePath, opened.model.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe));
    expect(() => readGgufLora(basePath)).toThrow(/base\.gguf: tensor 'token_embd\.weight' is not a LoRA tensor .*general\.type is missing: this looks like a model GGUF/);
    // serve refuses it before loading the model.
    await expect(createQaloraServer({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: SPEC, loras: [`x=${basePath}`] }))
      .rejects.toThrow(/--lora x=.*base\.gguf: tensor 'token_embd\.weight' is not a LoRA tensor/);
  });

  it('a plain LoRA whose A varies within a quantization group', () => {
    const plain: AdapterSet = opened.model.adapters.map(() => ({}));
    const rank = 2, inF = 64, out = 64;
    plain[1].q = { rank, alpha: 4, a: Float32Array.from({ length: rank * inF }, (_, i) => Math.sin(i)), b: new Float32Array(out * rank).fill(0.1) };
    savePeftAdapter(join(dir, 'plain'), plain, { kind: 'lora', groups: {}, pool: 'mean', dropout: 0 });
    expect(() => openAdapterFor(join(dir, 'plain'), opened.model.weights)).toThrow(
      /'base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight': row 0, columns 0\.\.31 \(one group of 32 inputs of the INT-b base\) differ by .*cannot apply/,
    );
  });
});

describe('qalora serve with plain LoRA adapters (PEFT and GGUF) on the QA-LoRA base', () => {
  it('serves each as the QA-LoRA adapter it came from', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-lora-serve-'));
    const t = await trainStories(6, { dir });
    const src = savedAdapter(t, join(dir, 'qalora'));
    exportLora('lora', join(dir, 'plain'), src, { model: t.model.config });
    exportLora('gguf-lora', join(dir, 'adapter.gguf'), src);
    const s = await createQaloraServer({
      model: fixture(STORIES), tokenizer: fixture(TOK), spec: t.spec, loras: [`qa=${join(dir, 'qalora')}`, `peft=${join(dir, 'plain')}`, `gguf=${join(dir, 'adapter.gguf')}`],
    });
    try {
      const { port } = await s.listen(0);
      const ask = async (model: string) => {
        const r = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
          method: 'POST', headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model, prompt: 'Once upon a time', max_tokens: 32, temperature: 0 }),
        });
        return ((await r.json()) as { choices: { text: string }[] }).choices[0].text;
      };
      const qa = await ask('qa');
      expect(await ask('peft')).toBe(qa);
      expect(await ask('gguf')).toBe(qa);
    } finally {
      await s.shutdown(1000);
    }
  });
});
