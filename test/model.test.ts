// The model on real checkpoints: cross-entropy of stories260K against an independent float64 figure
// (../shared/README.md: 1.2386 over the first 50 stories of tinystories-2MiB.txt, BOS added, 512-token
// windows, 16,247 tokens), the same with the base quantized at 4 bits by the stories260k spec, and the
// quantized base saved to our file and reloaded giving identical logits.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadSpecOrFail } from '../compiler/spec-file.ts';
import { loadModel } from '../runtime/formats/load.ts';
import { loadQuantizedBase, saveQuantizedBase } from '../runtime/model/basefile.ts';
import { calibrationFromText } from '../runtime/model/calib.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { Tokenizer } from '../runtime/tokenizer/types.ts';
import { fixture, needs, repoRoot } from './fixtures.ts';

const MODEL = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const STORIES = 'data/tinystories/tinystories-2MiB.txt';
const CALIB = 'data/tinystories/tinystories-5-stories.txt';

/** Mean CE over the first 50 stories, each BOS + text cut to 512 tokens, scored on its next tokens. */
function meanCe(model: LlamaModel, tok: Tokenizer): { ce: number; tokens: number } {
  const stories = readFileSync(fixture(STORIES), 'utf8').split('<|endoftext|>').slice(0, 50);
  let loss = 0, count = 0;
  for (const s of stories) {
    const ids = Int32Array.from(tok.encode(s.trim(), { bos: true }).slice(0, 512));
    const n = ids.length - 1;
    const r = model.loss(ids.subarray(0, n), ids.subarray(1), 1, n);
    loss += r.loss;
    count += r.count;
  }
  return { ce: loss / count, tokens: count };
}

describe('stories260K', () => {
  it('float, 4-bit quantized, and the quantized base saved and reloaded', needs(MODEL, TOK, STORIES), async () => {
    const { weights, tokenizer } = await loadModel(fixture(MODEL), { tokenizer: fixture(TOK) });
    const float = await LlamaModel.create(weights, { backend: 'cpu' });
    const f = meanCe(float, tokenizer);
    expect(f.tokens).toBe(16247);
    expect(Math.abs(f.ce - 1.2386)).toBeLessThan(0.0005);

    const spec = loadSpecOrFail(join(repoRoot, 'specs/stories260k.qal'));
    const quant = await LlamaModel.create(weights, { backend: 'cpu', spec });
    expect(quant.weights.blocks[0].proj.q.kind).toBe('quant');
    const q = meanCe(quant, tokenizer);
    console.log(`stories260K mean CE over 50 stories: float ${f.ce.toFixed(4)} (ppl ${Math.exp(f.ce).toFixed(3)}), ` +
      `4-bit RTN (specs/stories260k.qal) ${q.ce.toFixed(4)} (ppl ${Math.exp(q.ce).toFixed(3)})`);
    // Quantization costs something, but a 4-bit base of this model still models the text.
    expect(q.ce).toBeGreaterThan(f.ce);
    expect(q.ce).toBeLessThan(f.ce + 0.5);

    const file = join(mkdtempSync(join(tmpdir(), 'qalora-base-')), 'base.safetensors');
    saveQuantizedBase(file, quant.weights);
    const { weights: back } = loadQuantizedBase(file);
    const reloaded = await LlamaModel.create(back, { backend: 'cpu', spec });
    const ids = Int32Array.from(tokenizer.encode('Once upon a time, there was a dog.', { bos: true }));
    const a = quant.logits(ids, 1, ids.length), b = reloaded.logits(ids, 1, ids.length);
    expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
    // Without the spec, the reloaded base runs with the settings stored in the file: the same logits again.
    const noSpec = await LlamaModel.create(back, { backend: 'cpu' });
    expect(noSpec.spec?.layers.map((l) => [l.name, l.bits, l.group])).toEqual(spec.layers.map((l) => [l.name, l.bits, l.group]));
    expect(Buffer.from(noSpec.logits(ids, 1, ids.length).buffer).equals(Buffer.from(a.buffer))).toBe(true);
    // And the logits really are the quantized model's, not the float one's.
    expect(Buffer.from(float.logits(ids, 1, ids.length).buffer).equals(Buffer.from(a.buffer))).toBe(false);

    // GPTQ (calibrated on other stories than those scored) beats round-to-nearest at the same bits and groups,
    // and `qalora quantize --method gptq` writes exactly the base the in-process quantization makes.
    const calib = calibrationFromText(fixture(CALIB), tokenizer, { samples: 64, tokens: 256, context: weights.config.context });
    const gptq = await LlamaModel.create(weights, { backend: 'cpu', spec, quantize: 'gptq', calib });
    const g = meanCe(gptq, tokenizer);
    console.log(`stories260K 4-bit GPTQ (${calib.sequences.length} calibration sequences): CE ${g.ce.toFixed(4)} (ppl ${Math.exp(g.ce).toFixed(3)})`);
    expect(g.ce).toBeLessThan(q.ce);
    const cliFile = join(mkdtempSync(join(tmpdir(), 'qalora-gptq-')), 'gptq.safetensors');
    execFileSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'quantize', '--model', fixture(MODEL), '--tokenizer', fixture(TOK),
      '--spec', join(repoRoot, 'specs/stories260k.qal'), '--method', 'gptq', '--calib', fixture(CALIB), '--out', cliFile, '--quiet'], { stdio: 'ignore' });
    const fromCli = loadQuantizedBase(cliFile).weights;
    gptq.weights.blocks.forEach((b, l) => {
      for (const [p, lin] of Object.entries(b.proj)) {
        const other = fromCli.blocks[l].proj[p as keyof typeof b.proj];
        if (lin.kind !== 'quant' || other.kind !== 'quant') throw new Error(`layers.${l}.${p} is not quantized`);
        expect(Buffer.from(other.qweight.buffer).equals(Buffer.from(lin.qweight.buffer)), `layers.${l}.${p}.qweight`).toBe(true);
        expect(Array.from(other.beta), `layers.${l}.${p}.beta`).toEqual(Array.from(lin.beta));
      }
    });
  });
});
