// A llama.cpp user's quantized GGUF as a QA-LoRA base: stories260K with its projections (in = 64) and its
// embedding in Q4_0, Q4_1 or Q8_0 blocks (down, in = 172, stays F32 as a converter would leave it). Opened with
// no spec, the blocks are kept exactly (the spec is implied) and the model's logits equal those of the same file
// dequantized to fp32; a spec that disagrees is an error naming both; and the round trip no other tool offers —
// GGUF in → train → merge → GGUF out — gives a file llama.cpp runs, with every tensor the adapter did not touch
// byte-identical to the input's.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Llama } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mergeModel } from '../runtime/cli/merge.ts';
import { vocabFromTokenizer, writeGgufModel, buildGguf } from '../runtime/export/gguf.ts';
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import { parseGguf, readGguf, serializeGguf, type GgufWriteKV, type GgufWriteTensor } from '../runtime/formats/gguf.ts';
import { ggufToLlama } from '../runtime/formats/gguf-llama.ts';
import { denseTable, readAllFloat } from '../runtime/model/dense.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { openModel } from '../runtime/model/open.ts';
import type { QuantLinear } from '../runtime/model/types.ts';
import type { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { dataTokenizerFor, prepareData } from '../runtime/train/setup.ts';
import { train } from '../runtime/train/trainer.ts';
import { quantizeGgml } from '../runtime/formats/ggml-quantize.ts';
import { fixture, repoRoot } from './fixtures.ts';
import { cpuLlama, expectSameGreedy, llamaCppGreedy } from './llama-cpp.ts';
import { shakespeareSlice, STORIES, TOK } from './train-fixture.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-gguf-blocks-'));
// stories260k.qal with `scales fp16` on q (the rest as the spec has it): the same model as its fp32 twin above
// wherever the file's blocks are kept.
writeFileSync(join(dir, 'stories-s16.qal'), readFileSync(join(repoRoot, 'specs/stories260k.qal'), 'utf8').replace(/model stories260k/, 'model stories260k_s16').replace(/(adapters all_linear)/, '$1\n  override q { scales fp16 }'));
const concat = (chunks: Uint8Array[]) => new Uint8Array(Buffer.concat(chunks));

/** stories260K as a GGUF whose 32-divisible matrices are `type` blocks; `classifier` adds an untied output.weight. */
async function quantizedGguf(type: number, name: string, classifier?: number): Promise<string> {
  const opened = await openModel({ model: fixture(STORIES), tokenizer: fixture(TOK) });
  const float = parseGguf(concat(buildGguf(opened.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe)).chunks));
  const kvs: GgufWriteKV[] = [...float.metadata].filter(([k]) => k !== 'general.alignment').map(([k, kv]) => [k, kv.type, kv.value, kv.elemType]);
  kvs.push(['general.quantization_version', 4, 2]);
  const tensors: GgufWriteTensor[] = [];
  for (const t of float.tensors.values()) {
    const [cols, rows] = t.dims;
    const w = t.dims.length === 2 && cols % 32 === 0 ? new Float32Array(t.read().slice().buffer) : undefined;
    tensors.push(w ? { name: t.name, dims: t.dims, type, data: quantizeGgml(type, w, rows, cols) } : { name: t.name, dims: t.dims, type: t.type, data: t.read() });
    if (classifier !== undefined && t.name === 'token_embd.weight') {
      tensors.push({ name: 'output.weight', dims: t.dims, type: classifier, data: quantizeGgml(classifier, new Float32Array(t.read().slice().buffer).map((v) => -v), rows, cols) });
    }
  }
  const path = join(dir, name);
  writeFileSync(path, concat(serializeGguf(kvs, tensors)));
  return path;
}

/** The same file, every tensor dequantized to fp32: the model the kept blocks must reproduce. */
async function floatTwin(path: string): Promise<LlamaModel> {
  const w = readAllFloat(ggufToLlama(readGguf(path)));
  return LlamaModel.create({ ...w, tokEmbedding: denseTable(w.tokEmbedding), classifier: w.classifier === w.tokEmbedding ? denseTable(w.tokEmbedding) : denseTable(w.classifier) }, { backend: 'cpu' });
}

function maxRelDiff(a: Float32Array, b: Float32Array): number {
  let d = 0, m = 0;
  for (let i = 0; i < a.length; i++) { d = Math.max(d, Math.abs(a[i] - b[i])); m = Math.max(m, Math.abs(b[i])); }
  return d / m;
}

const TOKENS = Int32Array.from([1, 403, 407, 261, 378, 263, 304, 341, 443, 30, 99, 250]);

describe('GGUF Q4_0 / Q4_1 / Q8_0 files as QA-LoRA bases', () => {
  for (const [label, type, cls] of [['Q4_0', GgmlType.Q4_0, undefined], ['Q4_1 (+ untied Q8_0 classifier)', GgmlType.Q4_1, GgmlType.Q8_0], ['Q8_0', GgmlType.Q8_0, undefined]] as const) {
    it(`${label}: kept exactly without a spec, logits equal the dequantized file's`, async () => {
      const path = await quantizedGguf(type, `m-${type}.gguf`, cls);
      const { model, impliedSpec } = await openModel({ model: path, inferred: { rank: 0 } });
      const bits = type === GgmlType.Q8_0 ? 8 : 4;
      expect(impliedSpec).toMatch(new RegExp(`^q: bits ${bits} group 32 rank 0 .* scales fp16$`, 'm'));
      expect(impliedSpec).not.toMatch(/^down:/m); // in = 172 stayed F32 in the file: a float layer
      const q = model.weights.blocks[0].proj.q as QuantLinear;
      expect(q.kind).toBe('quant');
      // d and m kept as the file's fp16 bits (`scales fp16`), the token tables too
      expect(q.alpha).toBeInstanceOf(Uint16Array);
      expect((model.weights.tokEmbedding as QuantLinear).alpha).toBeInstanceOf(Uint16Array);
      expect(model.weights.blocks[0].proj.down.kind).toBe('float');
      expect(model.weights.tokEmbedding).not.toBeInstanceOf(Float32Array);
      expect(model.config.tiedClassifier).toBe(cls === undefined);
      const ours = model.logits(TOKENS, 1, TOKENS.length);
      const theirs = (await floatTwin(path)).logits(TOKENS, 1, TOKENS.length);
      expect(maxRelDiff(ours, theirs)).toBeLessThan(2e-5);
    });
  }

  it('a spec asking fp32 scales widens the file\'s fp16 d and m exactly: the same logits', async () => {
    const path = await quantizedGguf(GgmlType.Q4_1, 'q4_1-widen.gguf');
    const spec = join(repoRoot, 'specs/stories260k.qal'); // 4-bit g32, scales fp32 (down: g43, quantized from F32)
    const wide = (await openModel({ model: path, spec })).model;
    const q = wide.weights.blocks[0].proj.q as QuantLinear;
    expect(q.settings.scales).toBe('fp32');
    expect(q.alpha).toBeInstanceOf(Float32Array);
    const narrow = (await openModel({ model: path, spec: join(dir, 'stories-s16.qal') })).model;
    expect((narrow.weights.blocks[0].proj.q as QuantLinear).alpha).toBeInstanceOf(Uint16Array);
    expect(maxRelDiff(wide.logits(TOKENS, 1, TOKENS.length), narrow.logits(TOKENS, 1, TOKENS.length))).toBe(0);
  });

  it('a spec that disagrees with the blocks is an error naming both, unless --requantize', async () => {
    const path = await quantizedGguf(GgmlType.Q8_0, 'q8.gguf');
    const spec = join(repoRoot, 'specs/stories260k.qal'); // 4-bit
    await expect(openModel({ model: path, spec })).rejects.toThrow(/q8\.gguf: tensor 'blk\.0\.attn_q\.weight' stores Q8_0 blocks \(8 bits, group 32\) but the spec asks for 4 bits, group 32 at layers\.0\.q; .*--requantize/);
    const { model } = await openModel({ model: path, spec, requantize: true });
    expect((model.weights.blocks[0].proj.q as QuantLinear).settings.bits).toBe(4);
  });
});

describe('int8 activations (`--activations int8`) on a Q4_0 file', () => {
  it('decode stays close to the exact mode and switches back bit for bit; other backends refuse it', async () => {
    const path = await quantizedGguf(GgmlType.Q4_0, 'int8.gguf');
    const { model } = await openModel({ model: path, inferred: { rank: 0 } });
    const decode = () => {
      const s = model.newSession();
      s.prefill(TOKENS.subarray(0, 4));
      return Array.from(TOKENS.subarray(4), (t) => s.step(t).slice());
    };
    const exact = decode();
    model.activations = 'int8';
    const fast = decode();
    model.activations = 'fp32';
    const again = decode();
    for (let i = 0; i < exact.length; i++) {
      expect(Buffer.from(again[i].buffer).equals(Buffer.from(exact[i].buffer))).toBe(true);
      const d = maxRelDiff(fast[i], exact[i]);
      expect(d).toBeGreaterThan(0); // the int8 GEMV ran (q..up have in = 64: whole 32-blocks)
      expect(d).toBeLessThan(0.1); // ≈ 0.05 at most here: x_q's half step is 1/254 of each block's max|x|
    }
    await expect(openModel({ model: path, inferred: { rank: 0 }, backend: 'emu', activations: 'int8' }))
      .rejects.toThrow(/int8 activations are a mode of the CPU kernels; the 'emu' backend/);
  });
});

describe('the round trip: a Q4_0 GGUF → train → merge → GGUF that llama.cpp runs', () => {
  let llama: Llama;
  beforeAll(async () => {
    llama = await cpuLlama();
  });
  afterAll(async () => {
    await llama?.dispose();
  });

  it('untouched tensors come back byte-identical; llama.cpp greedy equals ours', async () => {
    const input = await quantizedGguf(GgmlType.Q4_0, 'in-q4_0.gguf');
    // No spec: the file's blocks, with adapter settings sized for this tiny model (in/g = 2).
    const { model, tokenizer } = await openModel({ model: input, inferred: { rank: 2, alpha: 4 }, seed: 1 });
    const data = prepareData(shakespeareSlice(dir), dataTokenizerFor(tokenizer, input), 64, 0.1);
    const groups = Object.fromEntries(model.spec!.layers.map((l) => [l.projection!, l.group]));
    await train({
      model, train: data.split.train, val: data.split.val, outDir: join(dir, 'run'),
      adapterInfo: { kind: 'qalora', groups, pool: 'mean', dropout: 0.05, bits: 4 },
      lr: 3e-3, schedule: 'constant', warmup: 0, batchSize: 4, gradAccum: 1, totalSteps: 6, evalEvery: 0, evalWindows: 2,
      saveEvery: 0, seed: 1, maxGradNorm: 0.3, weightDecay: 0, resume: false, quiet: true, plot: false, handleSigint: false,
    });
    const merged = (await mergeModel(model)).weights;
    const out = join(dir, 'out.gguf');
    writeGgufModel(out, merged, vocabFromTokenizer(tokenizer as SentencePieceBpe));
    const a = readGguf(input), b = readGguf(out);
    const same = (n: string) => Buffer.from(a.tensors.get(n)!.read()).equals(Buffer.from(b.tensors.get(n)!.read()));
    for (const n of ['token_embd.weight', 'output_norm.weight', 'blk.0.attn_norm.weight', 'blk.4.ffn_norm.weight', 'blk.2.ffn_down.weight']) {
      expect(b.tensors.get(n)!.type, n).toBe(a.tensors.get(n)!.type);
      expect(same(n), n).toBe(true);
    }
    // The adapted projections moved their zero points: Q4_1 now, q and d unchanged.
    expect(b.tensors.get('blk.0.attn_q.weight')!.type).toBe(GgmlType.Q4_1);
    expect(b.metadata.get('general.file_type')!.value).toBe(3);
    const mergedModel = await LlamaModel.create(merged, { backend: 'cpu', spec: model.spec, adapters: merged.blocks.map(() => ({})) });
    const prompt = tokenizer.encode('Once upon a time', { bos: true });
    expectSameGreedy(mergedModel, prompt, await llamaCppGreedy(llama, out, prompt, 48));
  });
});
