// Backward to the adapters: d(loss)/dA and d(loss)/dB of every adapter against central finite differences of
// the model's own loss, on a small random LLaMA whose projections use different pools, ranks, groups (one
// layer without an adapter), with GQA and a masked target; then with adapter dropout in training mode (the
// recomputed forward must drop the same values); gradient checkpointing on and off agree bit for bit. Also: sessions (prefill, step, stepBatch) agree with the
// full causal forward.
import { describe, expect, it } from 'vitest';
import { PROJECTIONS, type ResolvedLayer, type ResolvedSpec } from '../dsl/resolved.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { BackendName, BlockWeights, Linear, LlamaConfig, LlamaWeights, ProjectionName } from '../runtime/model/types.ts';
import { uniformStream } from '../runtime/random.ts';
import { OpProfile } from '../runtime/model/profile.ts';

const rng = uniformStream;

const CONFIG: LlamaConfig = { dim: 32, hidden: 48, layers: 2, heads: 4, kvHeads: 2, vocab: 37, context: 16, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: false };

function randomWeights(c: LlamaConfig, seed: number): LlamaWeights {
  const r = rng(seed);
  const u = (n: number, s: number) => Float32Array.from({ length: n }, () => (2 * r() - 1) * s);
  const kv = (c.dim / c.heads) * c.kvHeads;
  const lin = (out: number, inF: number): Linear => ({ kind: 'float', out, in: inF, w: u(out * inF, 1.2 / Math.sqrt(inF)) });
  const blocks: BlockWeights[] = Array.from({ length: c.layers }, () => ({
    attnNorm: Float32Array.from({ length: c.dim }, () => 1 + (2 * r() - 1) * 0.2),
    ffnNorm: Float32Array.from({ length: c.dim }, () => 1 + (2 * r() - 1) * 0.2),
    proj: {
      q: lin(c.dim, c.dim), k: lin(kv, c.dim), v: lin(kv, c.dim), o: lin(c.dim, c.dim),
      gate: lin(c.hidden, c.dim), up: lin(c.hidden, c.dim), down: lin(c.dim, c.hidden),
    },
  }));
  return { config: c, tokEmbedding: u(c.vocab * c.dim, 1), blocks, finalNorm: u(c.dim, 1).map((x) => 1 + 0.2 * x), classifier: u(c.vocab * c.dim, 0.5) };
}

const VARIANTS: Record<ProjectionName, Partial<ResolvedLayer>> = {
  q: { rank: 4, pool: 'mean', group: 8 },
  k: { rank: 2, pool: 'sum', group: 8 },
  v: { rank: 0, pool: 'mean', group: 16 },
  o: { rank: 3, pool: 'peft', group: 8 },
  gate: { rank: 4, pool: 'mean', group: 16 },
  up: { rank: 2, pool: 'sum', group: 4 },
  down: { rank: 4, pool: 'mean', group: 8 },
};

function smallSpec(c: LlamaConfig, dropout: number, backend: BackendName, dtypes?: Partial<Record<ProjectionName, ResolvedLayer['dtype']>>): ResolvedSpec {
  const kv = (c.dim / c.heads) * c.kvHeads;
  const shape: Record<ProjectionName, [number, number]> = { q: [c.dim, c.dim], k: [c.dim, kv], v: [c.dim, kv], o: [c.dim, c.dim], gate: [c.dim, c.hidden], up: [c.dim, c.hidden], down: [c.hidden, c.dim] };
  return {
    name: `gradcheck_${backend}${dtypes ? '_half' : ''}`, file: '<model-grad.test.ts>',
    model: { dim: c.dim, hidden: c.hidden, layers: c.layers, heads: c.heads, kvHeads: c.kvHeads, vocab: c.vocab, context: c.context, ropeTheta: c.ropeTheta, normEps: c.normEps },
    layers: PROJECTIONS.map((p) => ({
      name: p, projection: p, inFeatures: shape[p][0], outFeatures: shape[p][1], count: c.layers,
      bits: 4, alpha: 8, dropout, dtype: dtypes?.[p] ?? 'fp32', ...VARIANTS[p],
    }) as ResolvedLayer),
    targets: { cpu: true, cuda: backend === 'cpu' ? null : { archs: ['sm_80'] } },
  };
}

// One spec (one native build) for both checks: dropout applies only in training mode.
const DROPOUT = 0.25;

async function gradCheck(backend: BackendName, training: boolean, perTensor = 8): Promise<void> {
  const weights = randomWeights(CONFIG, 7);
  const spec = smallSpec(CONFIG, DROPOUT, backend);
  const model = await LlamaModel.create(weights, { backend, spec, seed: 3 });
  // B starts at zero (so dA would be zero too): give every adapter random A and B.
  const r = rng(11);
  for (const set of model.adapters) for (const ad of Object.values(set)) {
    for (const t of [ad!.a, ad!.b]) for (let i = 0; i < t.length; i++) t[i] = (2 * r() - 1) * 0.4;
  }
  const batch = 2, seqLen = 6, n = batch * seqLen;
  const tokens = Int32Array.from({ length: n }, () => Math.floor(r() * CONFIG.vocab));
  const targets = Int32Array.from({ length: n }, () => Math.floor(r() * CONFIG.vocab));
  const mask = Uint8Array.from({ length: n }, (_, i) => (i % 5 === 2 ? 0 : 1));
  const seed = 99;
  const lossAt = () => (training
    ? model.lossAndGrad(tokens, targets, batch, seqLen, { mask, training, seed }).loss
    : model.loss(tokens, targets, batch, seqLen, { mask }).loss);
  if (training) {
    // Dropout really acts (else this check would only repeat the first one).
    expect(Math.abs(lossAt() - model.loss(tokens, targets, batch, seqLen, { mask }).loss)).toBeGreaterThan(1e-4);
  }
  const { grads, count } = model.lossAndGrad(tokens, targets, batch, seqLen, { mask, training, seed });
  expect(count).toBe(mask.reduce((a, m) => a + m, 0));
  const analytic = grads.map((set) => Object.fromEntries(Object.entries(set).map(([p, g]) => [p, { a: g!.a.slice(), b: g!.b.slice() }])));
  let checked = 0, worst = 0;
  model.adapters.forEach((set, l) => {
    for (const p of PROJECTIONS) {
      const ad = set[p];
      if (VARIANTS[p].rank === 0) {
        expect(ad, `layers.${l}.${p} has rank 0`).toBeUndefined();
        continue;
      }
      expect(ad, `adapter layers.${l}.${p}`).toBeDefined();
      for (const which of ['a', 'b'] as const) {
        const param = ad![which], g = analytic[l][p][which];
        expect(g.length).toBe(param.length);
        // Every entry of small tensors; an even spread of entries of the larger ones.
        const idx = param.length <= perTensor ? [...param.keys()] : Array.from({ length: perTensor }, (_, i) => Math.floor(((i + 0.5) / perTensor) * param.length));
        for (const i of idx) {
          const keep = param[i], h = 1e-2;
          param[i] = keep + h;
          const up = lossAt();
          param[i] = keep - h;
          const down = lossAt();
          param[i] = keep;
          const fd = (up - down) / (2 * h);
          const err = Math.abs(fd - g[i]);
          worst = Math.max(worst, err / (1e-2 + Math.abs(fd)));
          expect(err, `${backend} layers.${l}.${p}.${which}[${i}]: analytic ${g[i]} vs finite difference ${fd}`).toBeLessThan(3e-3 + 1e-2 * Math.abs(fd));
          checked++;
        }
      }
    }
  });
  expect(checked).toBeGreaterThanOrEqual(2 * 2 * 6 * Math.min(perTensor, 4));
  console.log(`gradient check (${backend}, ${training ? `training, dropout ${DROPOUT}` : 'no dropout'}): ${checked} entries, worst relative error ${worst.toExponential(2)}`);
}

describe('adapter gradients match finite differences', () => {
  it('cpu backend', async () => {
    await gradCheck('cpu', false);
  });
  it('cpu backend with adapter dropout (training mode)', async () => {
    await gradCheck('cpu', true);
  });
  it('emulated CUDA backend (the generated .cu run on the CPU)', async () => {
    await gradCheck('emu', false, 3);
  });
  it('emulated CUDA backend, core ops included, gives the cpu backend\'s logits, loss and gradients', async () => {
    const weights = randomWeights(CONFIG, 9);
    const onCpu = await LlamaModel.create(weights, { backend: 'cpu', spec: smallSpec(CONFIG, DROPOUT, 'cpu'), seed: 3 });
    const onEmu = await LlamaModel.create(weights, { backend: 'emu', spec: smallSpec(CONFIG, DROPOUT, 'emu'), seed: 3 });
    // The model step really runs the GPU core ops (templates/cuda/core.cu), not the CPU ones.
    const coreOf = (m: LlamaModel) => (m as unknown as { runner: { core: Record<string, unknown> } }).runner.core;
    expect(coreOf(onEmu).attention_forward).not.toBe(coreOf(onCpu).attention_forward);
    const r = rng(21);
    onCpu.adapters.forEach((set, l) => {
      for (const [p, ad] of Object.entries(set)) {
        for (const t of [ad!.a, ad!.b]) for (let i = 0; i < t.length; i++) t[i] = (2 * r() - 1) * 0.4;
        onEmu.adapters[l][p as ProjectionName]!.a.set(ad!.a);
        onEmu.adapters[l][p as ProjectionName]!.b.set(ad!.b);
      }
    });
    const tokens = Int32Array.from({ length: 10 }, () => Math.floor(r() * CONFIG.vocab));
    const targets = Int32Array.from(tokens, (t) => (t + 1) % CONFIG.vocab);
    const mask = Uint8Array.from(tokens, (_, i) => (i === 3 ? 0 : 1)); // one ignored row through the GPU cross-entropy
    const a = onCpu.logits(tokens, 2, 5), b = onEmu.logits(tokens, 2, 5);
    for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i]), `logits[${i}]`).toBeLessThan(1e-4 * (1 + Math.abs(a[i])));
    const gc = onCpu.lossAndGrad(tokens, targets, 2, 5, { mask }), ge = onEmu.lossAndGrad(tokens, targets, 2, 5, { mask });
    expect(ge.count).toBe(gc.count);
    expect(Math.abs(ge.loss - gc.loss)).toBeLessThan(1e-4 * (1 + Math.abs(gc.loss)));
    gc.grads.forEach((set, l) => {
      for (const [p, g] of Object.entries(set)) {
        for (const which of ['a', 'b'] as const) {
          const x = g![which], y = ge.grads[l][p as ProjectionName]![which];
          for (let i = 0; i < x.length; i++) expect(Math.abs(x[i] - y[i]), `layers.${l}.${p}.${which}[${i}]`).toBeLessThan(1e-4 * (1 + Math.abs(x[i])));
        }
      }
    });
  });
});

describe('gradient checkpointing', () => {
  // Keeping each block's activations ('off') or recomputing them in backward ('on') runs the same kernels on the
  // same values: loss and gradients agree bit for bit, with dropout acting (the recompute must redraw it).
  for (const backend of ['cpu', 'emu'] as const) {
    it(`on, off and auto give the same loss and gradients bit for bit (${backend}, training with dropout)`, async () => {
      const weights = randomWeights(CONFIG, 13);
      const r = rng(31);
      const tokens = Int32Array.from({ length: 12 }, () => Math.floor(r() * CONFIG.vocab));
      const targets = Int32Array.from(tokens, (t) => (t + 3) % CONFIG.vocab);
      const results = [];
      for (const checkpointing of ['on', 'off', 'auto'] as const) {
        const profile = new OpProfile();
        const model = await LlamaModel.create(weights, { backend, spec: smallSpec(CONFIG, DROPOUT, backend), seed: 3, checkpointing, profile });
        const init = rng(41);
        for (const set of model.adapters) for (const ad of Object.values(set)) for (const t of [ad!.a, ad!.b]) for (let i = 0; i < t.length; i++) t[i] = (2 * init() - 1) * 0.4;
        profile.beginStep();
        const g = model.lossAndGrad(tokens, targets, 2, 6, { training: true, seed: 5 });
        profile.endStep();
        const recomputed = profile.report().rows.some((row) => row.name === 'recompute');
        expect(recomputed, `checkpointing ${checkpointing} recomputes`).toBe(checkpointing === 'on');
        results.push({ loss: g.loss, flat: g.grads.flatMap((set) => Object.values(set).flatMap((x) => [...x!.a, ...x!.b])) });
      }
      expect(results[0].flat.length).toBeGreaterThan(100);
      for (const other of results.slice(1)) {
        expect(other.loss).toBe(results[0].loss);
        expect(other.flat).toEqual(results[0].flat);
      }
    });
  }
});

describe('fp16 and bf16 activations', () => {
  it('give the fp32 model\'s logits and gradients up to half-precision rounding', async () => {
    const weights = randomWeights(CONFIG, 7);
    const half = { q: 'fp16', k: 'bf16', v: 'fp16', o: 'bf16', gate: 'fp16', up: 'bf16', down: 'fp16' } as const;
    const m32 = await LlamaModel.create(weights, { backend: 'cpu', spec: smallSpec(CONFIG, DROPOUT, 'cpu'), seed: 3 });
    const m16 = await LlamaModel.create(weights, { backend: 'cpu', spec: smallSpec(CONFIG, DROPOUT, 'cpu', half), seed: 3 });
    const r = rng(12);
    m32.adapters.forEach((set, l) => {
      for (const [p, ad] of Object.entries(set)) {
        for (const t of [ad!.a, ad!.b]) for (let i = 0; i < t.length; i++) t[i] = (2 * r() - 1) * 0.4;
        const other = m16.adapters[l][p as ProjectionName]!;
        other.a.set(ad!.a);
        other.b.set(ad!.b);
      }
    });
    const tokens = Int32Array.from({ length: 12 }, () => Math.floor(r() * CONFIG.vocab));
    const a = m32.logits(tokens, 2, 6), b = m16.logits(tokens, 2, 6);
    let diff = 0, scale = 0;
    for (let i = 0; i < a.length; i++) {
      diff = Math.max(diff, Math.abs(a[i] - b[i]));
      scale = Math.max(scale, Math.abs(a[i]));
    }
    expect(diff).toBeGreaterThan(0); // the half-precision path really ran
    expect(diff).toBeLessThan(0.03 * scale);
    const g32 = m32.lossAndGrad(tokens, tokens, 2, 6).grads, g16 = m16.lossAndGrad(tokens, tokens, 2, 6).grads;
    g32.forEach((set, l) => {
      for (const [p, g] of Object.entries(set)) {
        for (const which of ['a', 'b'] as const) {
          const x = g![which], y = g16[l][p as ProjectionName]![which];
          let dot = 0, nx = 0, ny = 0;
          for (let i = 0; i < x.length; i++) {
            dot += x[i] * y[i];
            nx += x[i] * x[i];
            ny += y[i] * y[i];
          }
          expect(dot / Math.sqrt(nx * ny), `layers.${l}.${p}.${which}: cosine of fp16/bf16 and fp32 gradients`).toBeGreaterThan(0.99);
        }
      }
    });
  });
});

describe('generation sessions agree with the causal forward', () => {
  it('prefill, step and stepBatch give the logits of model.logits at each position', async () => {
    const model = await LlamaModel.create(randomWeights(CONFIG, 5), { backend: 'cpu' });
    const r = rng(2), T = 9, V = CONFIG.vocab;
    const seqs = [0, 1, 2].map(() => Int32Array.from({ length: T }, () => Math.floor(r() * V)));
    const full = seqs.map((s) => model.logits(s, 1, T));
    const close = (a: Float32Array, b: Float32Array, what: string) => {
      let m = 0;
      for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
      expect(m, what).toBeLessThan(1e-4);
    };
    // One session: prefill 4, then steps.
    const s = model.newSession();
    close(s.prefill(seqs[0].subarray(0, 4)), full[0].subarray(3 * V, 4 * V), 'prefill');
    for (let t = 4; t < T; t++) close(s.step(seqs[0][t]), full[0].subarray(t * V, (t + 1) * V), `step ${t}`);
    expect(s.pos).toBe(T);
    // Three sessions at different positions, stepped together.
    const ss = seqs.map(() => model.newSession());
    ss[0].prefill(seqs[0].subarray(0, 2));
    ss[1].prefill(seqs[1].subarray(0, 5));
    ss[2].prefill(seqs[2].subarray(0, 1));
    const at = [2, 5, 1];
    for (let k = 0; k < 3; k++) {
      const out = model.stepBatch(ss, at.map((p, i) => seqs[i][p]));
      out.forEach((o, i) => close(o, full[i].subarray(at[i] * V, (at[i] + 1) * V), `stepBatch session ${i} position ${at[i]}`));
      for (let i = 0; i < 3; i++) at[i]++;
    }
    // truncate keeps a prefix: re-stepping gives the same logits again.
    ss[1].truncate(3);
    close(ss[1].step(seqs[1][3]), full[1].subarray(3 * V, 4 * V), 'after truncate');
    expect(() => model.stepBatch([ss[0], ss[0]], [1, 2])).toThrow(/twice/);
    const long = model.newSession();
    expect(() => long.prefill(new Int32Array(CONFIG.context + 1))).toThrow(/context/);
  });

  it('rejects bad batches with errors naming the problem', async () => {
    const model = await LlamaModel.create(randomWeights(CONFIG, 5), { backend: 'cpu' });
    const t = new Int32Array(8);
    expect(() => model.loss(t, t, 2, 3)).toThrow(/tokens has 8 entries, expected batch·seqLen = 6/);
    expect(() => model.logits(Int32Array.of(1, 99), 1, 2)).toThrow(/tokens\[1\] = 99 is outside the vocabulary/);
    expect(() => model.logits(new Int32Array(17), 1, 17)).toThrow(/exceeds the model's context 16/);
    const bad = randomWeights(CONFIG, 5);
    bad.blocks[1].proj.up = { kind: 'float', out: CONFIG.hidden, in: CONFIG.dim, w: new Float32Array(10) };
    await expect(LlamaModel.create(bad, { backend: 'cpu' })).rejects.toThrow(/layers\.1\.up\.weight has 10 values, expected 1536/);
  });
});
