// The trainer's pieces against independent formulas, and the loop's promises on a toy model: the loss falls,
// gradient accumulation equals a bigger batch, and a stopped-then-resumed run equals an uninterrupted one bit
// for bit (adapters, optimizer, data order, dropout seeds all restored).
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadPeftAdapter } from '../runtime/adapters/peft.ts';
import { splitWindows } from '../runtime/data/dataset.ts';
import type { TokenStream } from '../runtime/data/tokenize.ts';
import { AdamW } from '../runtime/train/adamw.ts';
import { defaultLearningRate, readConfigFile, resolveTrainConfig } from '../runtime/train/config.ts';
import { paramList } from '../runtime/train/params.ts';
import { learningRate } from '../runtime/train/schedule.ts';
import { train, type TrainerOptions } from '../runtime/train/trainer.ts';
import { ToyModel } from './train-helpers.ts';
import { formatDuration, Progress, sparkline } from '../runtime/progress.ts';
import { PassThrough } from 'node:stream';

const dir = mkdtempSync(join(tmpdir(), 'qalora-train-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('progress', () => {
  it('prints plain lines with rate, ETA and fields when the stream is not a TTY', () => {
    const sink = new PassThrough();
    let text = '';
    sink.on('data', (d) => (text += d));
    const p = new Progress({ label: 'train', total: 10, unit: 'steps', stream: sink, plainEverySeconds: 0 });
    p.update(4, { loss: 2.5, lr: 1e-4 });
    p.log('step 4: validation loss 2.4');
    p.stop();
    const lines = text.trim().split('\n');
    expect(lines[0]).toMatch(/^train  40% 4\/10 steps \| [\d.e+-]+ steps\/s \| ETA \S+ \| loss 2\.500 \| lr 1\.00e-4$/);
    expect(lines[1]).toBe('step 4: validation loss 2.4');
    expect(lines[2]).toMatch(/^train  40% 4\/10 steps/);
    expect(text).not.toContain('\x1b'); // no cursor control off a TTY
    expect(formatDuration(3725)).toBe('1h02m');
    expect(formatDuration(64)).toBe('1m04s');
    expect(sparkline([3, 2, 1])).toBe('█▅▁');
    expect(sparkline(Array.from({ length: 100 }, (_, i) => 100 - i), 10)).toHaveLength(10);
  });
});

describe('AdamW', () => {
  it('matches the bias-corrected step-size form of Adam with decoupled weight decay', () => {
    const p0 = [0.5, -1.25, 2, 0.1];
    const ref = { p: [...p0], m: [0, 0, 0, 0], v: [0, 0, 0, 0] };
    const lr = 0.01, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
    const data = Float32Array.from(p0);
    const opt = new AdamW([{ key: 'x', block: 0, proj: 'q', which: 'a', data }], { beta1: b1, beta2: b2, eps, weightDecay: wd });
    for (let t = 1; t <= 5; t++) {
      const g = Float32Array.from(p0, (_, i) => Math.sin(t * (i + 1)));
      opt.step([g], lr);
      // Kingma & Ba's efficient form: α_t = lr·√(1−β2^t)/(1−β1^t), ε̂ = ε·√(1−β2^t); decay applied to p first.
      const at = (lr * Math.sqrt(1 - b2 ** t)) / (1 - b1 ** t);
      for (let i = 0; i < 4; i++) {
        ref.m[i] = b1 * ref.m[i] + (1 - b1) * g[i];
        ref.v[i] = b2 * ref.v[i] + (1 - b2) * g[i] ** 2;
        ref.p[i] = ref.p[i] * (1 - lr * wd) - (at * ref.m[i]) / (Math.sqrt(ref.v[i]) + eps * Math.sqrt(1 - b2 ** t));
      }
    }
    for (let i = 0; i < 4; i++) expect(data[i]).toBeCloseTo(ref.p[i], 6);
  });
});

describe('schedules', () => {
  const base = { lr: 1e-3, warmupSteps: 10, totalSteps: 110 };
  it('warms up linearly, then holds, cosine-decays or linearly decays', () => {
    for (const name of ['constant', 'cosine', 'linear'] as const) {
      expect(learningRate(5, { ...base, name })).toBeCloseTo(5e-4, 12);
      expect(learningRate(10, { ...base, name })).toBeCloseTo(1e-3, 12);
    }
    expect(learningRate(110, { ...base, name: 'constant' })).toBe(1e-3);
    expect(learningRate(60, { ...base, name: 'cosine' })).toBeCloseTo(5e-4, 12); // halfway: cos(π/2)
    expect(learningRate(110, { ...base, name: 'cosine' })).toBeCloseTo(0, 12);
    expect(learningRate(35, { ...base, name: 'linear' })).toBeCloseTo(7.5e-4, 12);
  });
});

describe('config', () => {
  it('layers defaults < file < flags and names bad values with their origin', () => {
    const yml = join(dir, 'run.yaml');
    writeFileSync(yml, 'model: m.bin\ndata: d.txt\nout: runs/x\nlr: 0.001\nbatch-size: 8\nmax_steps: 20\n');
    const file = readConfigFile(yml);
    const c = resolveTrainConfig(file, { lr: '0.002', seed: undefined }, yml);
    expect(c.lr).toBe(0.002);
    expect(c.batchSize).toBe(8);
    expect(c.maxSteps).toBe(20);
    expect(c.maxGradNorm).toBe(0.3);
    expect(c.schedule).toBe('constant');
    expect(() => resolveTrainConfig(file, { batchSize: '0' }, yml)).toThrow(/--batch-size: expected a positive integer, got 0/);
    expect(() => resolveTrainConfig({ ...file, schedule: 'cyclic' }, {}, yml)).toThrow(/schedule \(in .*run\.yaml\): unknown schedule 'cyclic'/);
    writeFileSync(yml, 'model: m\nlearning_rate: 1\n');
    expect(() => readConfigFile(yml)).toThrow(/unknown key 'learning_rate'/);
    expect(() => resolveTrainConfig({}, { model: 'm', data: 'd' })).toThrow(/missing required setting 'out'/);
    expect(defaultLearningRate(4096)).toBeCloseTo(2e-4, 12);
    expect(defaultLearningRate(64)).toBeCloseTo(1.6e-3, 12);
  });
});

// A token stream with learnable structure: the next token is a function of the current one.
function toyStream(n: number): TokenStream {
  const tokens = new Int32Array(n), mask = new Uint8Array(n).fill(1);
  let x = 3;
  for (let i = 0; i < n; i++) {
    tokens[i] = x;
    x = (x * 5 + 1 + (i % 7 === 0 ? 1 : 0)) % 16;
  }
  mask[0] = 0;
  return { tokens, mask, starts: Int32Array.of(0) };
}

function options(model: ToyModel, out: string, over: Partial<TrainerOptions> = {}): TrainerOptions {
  const split = splitWindows(toyStream(2000), 16, 0.1);
  return {
    model, train: split.train, val: split.val, outDir: out, adapterInfo: { kind: 'qalora', groups: { q: 32 }, pool: 'mean', dropout: 0.2 },
    lr: 0.05, schedule: 'cosine', warmup: 2, batchSize: 4, gradAccum: 2, totalSteps: 12, evalEvery: 4, evalWindows: 0,
    saveEvery: 3, seed: 11, maxGradNorm: 0.3, weightDecay: 0.01, resume: false, quiet: true, plot: false, handleSigint: false,
    ...over,
  };
}

describe('training loop', () => {
  it('lowers the loss, logs metrics, writes the adapter and a plot', async () => {
    const out = join(dir, 'fall');
    const model = new ToyModel();
    const r = await train(options(model, out, { totalSteps: 30, lr: 0.1, schedule: 'constant', plot: true }));
    const head = r.losses.slice(0, 3).reduce((a, b) => a + b) / 3;
    const tail = r.losses.slice(-3).reduce((a, b) => a + b) / 3;
    expect(tail).toBeLessThan(head * 0.8);
    expect(r.evals[r.evals.length - 1].loss).toBeLessThan(r.evals[0].loss);
    const lines = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.filter((l) => l.kind === 'train').map((l) => l.loss)).toEqual(r.losses);
    expect(lines.filter((l) => l.kind === 'eval').every((l) => Math.abs(l.valPerplexity - Math.exp(l.valLoss)) < 1e-9)).toBe(true);
    const back = loadPeftAdapter(join(out, 'adapter'));
    expect(Array.from(back.adapters[0].q!.a)).toEqual(Array.from(model.adapters[0].q!.a));
    expect(readFileSync(join(out, 'loss.svg'), 'utf8')).toContain('<svg');
    expect(readFileSync(join(out, 'loss.png')).subarray(1, 4).toString()).toBe('PNG');
  });

  it('accumulating 2 micro-batches of 2 equals one batch of 4', async () => {
    const a = new ToyModel(16, 4, 3, 0), b = new ToyModel(16, 4, 3, 0);
    const ra = await train(options(a, join(dir, 'acc-a'), { batchSize: 4, gradAccum: 1, totalSteps: 3, saveEvery: 0 }));
    const rb = await train(options(b, join(dir, 'acc-b'), { batchSize: 2, gradAccum: 2, totalSteps: 3, saveEvery: 0 }));
    ra.losses.forEach((l, i) => expect(rb.losses[i]).toBeCloseTo(l, 5));
    const pa = paramList(a.adapters), pb = paramList(b.adapters);
    pa.forEach((p, k) => p.data.forEach((v, i) => expect(pb[k].data[i]).toBeCloseTo(v, 5)));
  });

  it('resumes exactly: stop at step 5, resume to 12 equals an uninterrupted 12-step run', async () => {
    const full = new ToyModel();
    const rf = await train(options(full, join(dir, 'full')));
    const out = join(dir, 'split');
    const first = new ToyModel();
    const r1 = await train(options(first, out, { shouldStop: () => true, saveEvery: 0 })); // stops after step 1
    expect(r1.interrupted).toBe(true);
    expect(r1.steps).toBe(1);
    expect(existsSync(join(out, 'adapter'))).toBe(false);
    const second = new ToyModel();
    let n = 0;
    const r2 = await train(options(second, out, { resume: true, shouldStop: () => ++n >= 4 })); // steps 2..5
    expect(r2.startStep).toBe(1);
    expect(r2.steps).toBe(5);
    const third = new ToyModel(); // fresh weights: everything must come from the checkpoint
    const r3 = await train(options(third, out, { resume: true }));
    expect(r3.startStep).toBe(5);
    expect([...r1.losses, ...r2.losses, ...r3.losses]).toEqual(rf.losses);
    expect(Array.from(third.adapters[0].q!.a)).toEqual(Array.from(full.adapters[0].q!.a));
    expect(Array.from(third.adapters[0].q!.b)).toEqual(Array.from(full.adapters[0].q!.b));
    const log = (p: string) => readFileSync(join(p, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const strip = (rs: Record<string, number>[]) => rs.map(({ step, loss, lr, gradNorm, valLoss }) => ({ step, loss, lr, gradNorm, valLoss }));
    expect(strip(log(out))).toEqual(strip(log(join(dir, 'full'))));
    // Changing what the data order depends on is refused.
    await expect(train(options(new ToyModel(), out, { resume: true, seed: 12 }))).rejects.toThrow(/seed was 11 in the checkpoint but is 12/);
  });
});
