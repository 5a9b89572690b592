// The GPU runtime's contract, checked where there is no GPU: the emulator runs the generated CUDA and counts what
// a GPU run would pay for (templates/emu/emu_counters.h). On stories260K, the model is uploaded once; a decode
// step sends its token id and position up, waits once and reads its logits back; a training step uploads only
// ids, positions and targets and reads back only its loss and its gradient norm (the trainer, AdamW on the
// device; model.lossAndGrad alone also uploads the host's adapters and returns the gradients); and in a steady
// state nothing is allocated. The results are those of the cpu backend: llama2.c's goldens, and the same training losses.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSpec } from '../dsl/index.ts';
import { demoAssets } from '../runtime/assets.ts';
import { readLlama2c } from '../runtime/formats/llama2c.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { generate } from '../runtime/model/generate.ts';
import { loadNativeOps } from '../runtime/model/native-ops.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { AdamW } from '../runtime/train/adamw.ts';
import { alignedGrads, paramList } from '../runtime/train/params.ts';
import { dataTokenizerFor, openForRun, prepareData } from '../runtime/train/setup.ts';
import { train } from '../runtime/train/trainer.ts';
import type { EmuCounters } from '../runtime/native.ts';
import { fixture, needs, repoRoot } from './fixtures.ts';

type Counters = () => EmuCounters;
type Reset = () => void;

/** The counters of the addon the model runs (loadNativeOps loads each build once). */
async function emuCounters(spec?: Parameters<typeof loadNativeOps>[0]): Promise<{ counters: Counters; reset: Reset }> {
  const { addon } = await loadNativeOps(spec, 'emu');
  return { counters: addon.emuCounters!, reset: addon.emuResetCounters! };
}

describe('float stories260K on --backend emu: weights resident, one wait per decode step', () => {
  let model: LlamaModel;
  let emu: { counters: Counters; reset: Reset };
  beforeAll(async () => {
    model = await LlamaModel.create(readLlama2c(demoAssets.model), { backend: 'emu' });
    emu = await emuCounters();
  }, 900_000);

  it('greedy generation equals llama2.c\'s output', needs('golden/stories260K_greedy_n200.txt'), () => {
    const tok = readLlama2cTokenizer(demoAssets.tokenizer, model.config.vocab);
    let out = '';
    generate(model, tok, { steps: 200, temperature: 0, onText: (t) => (out += t) });
    expect(out + '\n').toBe(readFileSync(fixture('golden/stories260K_greedy_n200.txt'), 'utf8'));
  });

  it('a decode step uploads 8 bytes, downloads the logits, waits once and allocates nothing', () => {
    const { vocab } = model.config;
    const s = model.newSession();
    let logits = s.prefill([1, 403, 411]);
    for (let i = 0; i < 2; i++) logits = s.step(argmax(logits)); // warm-up: the pool learns this step's sizes
    for (let i = 0; i < 8; i++) {
      emu.reset();
      logits = s.step(argmax(logits));
      const c = emu.counters();
      // The contract of the issue: ≤ 64 + 4 per id up, ≤ 4·vocab down, at most one wait, no allocation.
      expect(c.h2dBytes).toBeLessThanOrEqual(64 + 4);
      expect(c.d2hBytes).toBeLessThanOrEqual(4 * vocab);
      expect(c.syncs).toBeLessThanOrEqual(1);
      expect(c.allocs).toBe(0);
      // What it is exactly: one upload of [id | position], one download of the logits.
      expect([c.h2dCalls, c.h2dBytes, c.d2hCalls, c.d2hBytes, c.syncs]).toEqual([1, 8, 1, 4 * vocab, 1]);
      expect(c.launches).toBeGreaterThan(model.config.layers * 10);
    }
  });

  it('a batched step of 4 streams: ids and positions in one upload, all logits in one download', () => {
    const { vocab } = model.config;
    const start = (i: number) => [1, 300 + i];
    const batched = [0, 1, 2, 3].map(() => model.newSession());
    let logits: Float32Array[] = batched.map((s, i) => s.prefill(start(i)).slice());
    const ids = [logits.map(argmax)];
    logits = model.stepBatch(batched, ids[0]).map((l) => l.slice()); // warm-up
    ids.push(logits.map(argmax));
    emu.reset();
    logits = model.stepBatch(batched, ids[1]);
    const c = emu.counters();
    expect(c.h2dBytes).toBeLessThanOrEqual(64 + 4 * 4);
    expect([c.h2dCalls, c.d2hCalls, c.d2hBytes, c.syncs, c.allocs]).toEqual([1, 1, 4 * vocab * 4, 1, 0]);
    // Each stream gets what it would alone.
    [0, 1, 2, 3].forEach((i) => {
      const s = model.newSession();
      s.prefill(start(i));
      s.step(ids[0][i]);
      const alone = s.step(ids[1][i]);
      for (let j = 0; j < vocab; j++) expect(Math.abs(alone[j] - logits[i][j])).toBeLessThan(1e-4 * (1 + Math.abs(alone[j])));
    });
  });
});

describe('QA-LoRA stories260K on --backend emu: training on device-resident tensors', () => {
  const spec = loadSpec(`${repoRoot}/specs/stories260k.qal`).spec!;
  const weights = () => readLlama2c(demoAssets.model);
  let onCpu: LlamaModel, onEmu: LlamaModel;
  let emu: { counters: Counters; reset: Reset };
  beforeAll(async () => {
    onCpu = await LlamaModel.create(weights(), { backend: 'cpu', spec, seed: 5 });
    onEmu = await LlamaModel.create(weights(), { backend: 'emu', spec, seed: 5 });
    emu = await emuCounters(spec);
  }, 900_000);

  const batch = 2, seqLen = 32;
  const text = readFileSync(demoAssets.data, 'utf8');
  const tokens = (step: number) => Int32Array.from({ length: batch * seqLen + 1 }, (_, i) => text.charCodeAt((step * 97 + i) % text.length) % 512);

  it('six AdamW steps give the cpu backend\'s losses within 1e-4', () => {
    const run = (model: LlamaModel) => {
      const params = paramList(model.adapters);
      const opt = new AdamW(params);
      const losses: number[] = [];
      for (let step = 0; step < 6; step++) {
        const t = tokens(step);
        const { loss, count, grads } = model.lossAndGrad(t.subarray(0, -1), t.subarray(1), batch, seqLen, { training: true, seed: step });
        losses.push(loss / count);
        opt.step(alignedGrads(params, grads), 1e-2, 1 / count);
      }
      return losses;
    };
    const [a, b] = [run(onCpu), run(onEmu)];
    expect(a[5]).toBeLessThan(a[0]); // it trains
    b.forEach((l, i) => expect(Math.abs(l - a[i]), `step ${i}: ${l} vs ${a[i]}`).toBeLessThan(1e-4));
  });

  it('a training step uploads ids, targets and adapters only, and reads back the loss and the gradients', () => {
    const t = tokens(9);
    const step = () => onEmu.lossAndGrad(t.subarray(0, -1), t.subarray(1), batch, seqLen, { training: true, seed: 9 });
    step(); // warm-up
    emu.reset();
    const { grads } = step();
    const c = emu.counters();
    const m = batch * seqLen;
    const adapterBytes = paramList(onEmu.adapters).reduce((n, p) => n + p.data.byteLength, 0);
    const gradBytes = paramList(grads).reduce((n, p) => n + p.data.byteLength, 0);
    expect(adapterBytes).toBe(gradBytes);
    // Up: token ids, positions and targets (4 bytes each per row) and every adapter's A and B: no weight.
    expect(c.h2dBytes).toBe(3 * 4 * m + adapterBytes);
    // Down: the loss (summed on the device: 8 bytes) and all gradients in one download.
    expect([c.d2hCalls, c.d2hBytes]).toEqual([2, 8 + gradBytes]);
    expect([c.syncs, c.allocs, c.frees]).toEqual([2, 0, 0]);
  });
});

describe('the trainer on --backend emu: adapters, gradients and AdamW moments stay on the device', () => {
  const spec = loadSpec(`${repoRoot}/specs/stories260k.qal`).spec!;
  const dir = mkdtempSync(join(tmpdir(), 'qalora-device-train-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  async function run(backend: 'cpu' | 'emu', onStep?: (step: number) => void) {
    const { model, tokenizer } = await openForRun({ model: demoAssets.model, tokenizer: demoAssets.tokenizer, spec, backend, seed: 3 });
    const slice = join(dir, 'slice.txt');
    writeFileSync(slice, readFileSync(demoAssets.data, 'utf8').slice(0, 30_000));
    const data = prepareData(slice, dataTokenizerFor(tokenizer, demoAssets.tokenizer), 64, 0.1);
    const layers = spec.layers.filter((l) => l.projection);
    const result = await train({
      model, train: data.split.train, val: data.split.val, outDir: join(dir, backend),
      adapterInfo: { kind: 'qalora', groups: Object.fromEntries(layers.map((l) => [l.projection!, l.group])), pool: 'mean', dropout: 0.05, bits: 4 },
      // gradAccum 2: the micro-batches' gradients add up on the device; maxGradNorm 0.3: clipping is active.
      lr: 3e-3, schedule: 'constant', warmup: 0, batchSize: 2, gradAccum: 2, totalSteps: 5, evalEvery: 0, evalWindows: 2,
      saveEvery: 3, seed: 1, maxGradNorm: 0.3, weightDecay: 0.01, resume: false, quiet: true, plot: false, handleSigint: false,
      onStep: ({ step }) => onStep?.(step),
    });
    return { model, result };
  }

  it('gives the cpu trainer\'s losses and adapters, and a step reads back only its losses and its gradient norm', async () => {
    const cpu = await run('cpu');
    const { addon } = await loadNativeOps(spec, 'emu');
    const perStep: EmuCounters[] = [];
    const emu = await run('emu', (step) => {
      if (step > 1) perStep.push(addon.emuCounters!());
      addon.emuResetCounters!();
    });
    emu.result.losses.forEach((l, i) => expect(Math.abs(l - cpu.result.losses[i]), `step ${i + 1}`).toBeLessThan(1e-4));
    // The trained adapters came back to the host (at the checkpoint of step 3 and at the end).
    const [a, b] = [paramList(cpu.model.adapters), paramList(emu.model.adapters)];
    a.forEach((p, k) => p.data.forEach((x, i) => expect(Math.abs(b[k].data[i] - x), `${p.key}[${i}]`).toBeLessThan(1e-4)));
    // Steps 2 and 3: per micro-batch, ids, positions and targets go up and the loss comes down (8 bytes); once per
    // step the gradient norm (8 bytes). No adapter, no weight, no gradient moves.
    const rows = 2 * 64, paramBytes = a.reduce((n, p) => n + p.data.byteLength, 0);
    for (const c of [perStep[0], perStep[1]]) {
      expect([c.h2dCalls, c.h2dBytes]).toEqual([2 * 3, 2 * 3 * 4 * rows]);
      expect([c.d2hCalls, c.d2hBytes, c.syncs]).toEqual([2 + 1, 2 * 8 + 8, 3]);
      expect([c.allocs, c.frees]).toEqual([0, 0]);
    }
    // The checkpoint after step 3 (counted with step 4) reads the adapters and both AdamW moments back, once each.
    expect([perStep[2].d2hCalls, perStep[2].d2hBytes]).toEqual([3 + 3, 2 * 8 + 8 + 3 * paramBytes]);
  });
});

function argmax(a: Float32Array): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}
