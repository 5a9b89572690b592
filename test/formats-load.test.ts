import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { detectFormat, loadModel, loadTokenizer } from '../runtime/formats/load.ts';
import { fixture, needs } from './fixtures.ts';
import { expectSameWeights } from './formats-helpers.ts';

const BIN = 'models/stories260K/stories260K.bin';
const GGUF = 'models/stories260K/stories260K-f32.gguf-v1.gguf';
const TOK = 'models/stories260K/tok512.bin';
const SPM = 'models/stories260K/tok512.model';
const AID = 'models/aidreams260K/aidreams260K.bin';
const LLAMA2 = 'models/llama2-tokenizer/tokenizer.bin';

const rejects = async (p: Promise<unknown>, re: RegExp) => {
  const e = await p.then(() => null, (err) => err);
  expect(e, `expected ${re}`).toBeInstanceOf(QaloraError);
  expect((e as Error).message).toMatch(re);
};

describe('loadModel', () => {
  it('detects llama2.c, GGUF; finds the tokenizer beside the model or in the GGUF; equal weights', needs(BIN, GGUF, TOK, AID), async () => {
    const a = await loadModel(fixture(BIN));
    const b = await loadModel(fixture(GGUF));
    expect([a.format, b.format]).toEqual(['llama2c', 'gguf']);
    expectSameWeights(a.weights, b.weights);
    for (const m of [a, b]) expect(m.tokenizer.encode('Once upon a time', { bos: true })).toEqual([1, 403, 407, 261, 378]);
    const c = await loadModel(fixture(AID));
    expect(c.weights.config.layers).toBe(4);
    expect(c.tokenizer.vocabSize).toBe(512);
  });

  it('takes an explicit tokenizer of any kind: tokenizer.bin, SentencePiece .model, GGUF', needs(BIN, GGUF, TOK, SPM), async () => {
    for (const t of [TOK, SPM, GGUF]) {
      const m = await loadModel(fixture(BIN), { tokenizer: fixture(t) });
      expect(m.tokenizer.encode('Hello, world!', { bos: true }), t).toEqual([1, 346, 306, 414, 432, 263, 304, 341, 443]);
    }
    expect((await loadTokenizer(fixture(SPM))).vocabSize).toBe(512);
  });

  it('bad inputs: missing path, empty directory, tokenizer of another model, no tokenizer, garbage', needs(BIN, LLAMA2), async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-load-'));
    await rejects(loadModel(join(dir, 'nope.bin')), /nope\.bin: no such model file or directory/);
    expect(() => detectFormat(dir)).toThrow(/needs config\.json \(Hugging Face\) or quantize_config\.json \(GPTQ\)/);
    await rejects(loadModel(fixture(BIN), { tokenizer: fixture(LLAMA2) }), /tokenizer\.bin: has 32000 tokens but the model's vocabulary is 512/);
    mkdirSync(join(dir, 'alone'));
    copyFileSync(fixture(BIN), join(dir, 'alone', 'model.bin'));
    await rejects(loadModel(join(dir, 'alone', 'model.bin')), /model\.bin: no tokenizer given and none beside the model .*pass --tokenizer/);
    writeFileSync(join(dir, 'garbage.bin'), Buffer.alloc(64, 0xff));
    await rejects(loadModel(join(dir, 'garbage.bin')), /garbage\.bin: not a llama2\.c checkpoint/);
    const gg = readFileSync(fixture(GGUF));
    writeFileSync(join(dir, 'cut.gguf'), gg.subarray(0, gg.length - 1000));
    await rejects(loadModel(join(dir, 'cut.gguf')), /cut\.gguf: tensor 'output\.weight': F32 \[64,512\] needs 131072 bytes/);
    mkdirSync(join(dir, 'hf'));
    writeFileSync(join(dir, 'hf', 'config.json'), '{"hidden_size": 64');
    await rejects(loadModel(join(dir, 'hf')), /config\.json: cannot read config\.json/);
  });
});
