// Whole-model numbers on a GPU backend through the runtime's own path: a LlamaModel on device-resident tensors
// (runtime/model/memory.ts), as `qalora generate|serve|train --backend cuda` runs it. LLaMA-7B-shaped decode at
// batch 1 and 8 against the bandwidth roofline (every weight read once per step at the copy bandwidth measured in
// the same run), and a training step at sequence 2048 against the compute roofline (6·params·tokens at the cuBLAS
// rate bench.cu measured, when given). The weights are random in the spec's layout: the timings do not depend on
// the values. Run by bench/gpu-check.sh; with --backend emu --shape tiny it is the dry run, and prints the
// emulator's counters per decode and training step (what a GPU would transfer, wait for and allocate).
//
//   npx tsx bench/gpu-model.ts --backend cuda [--shape llama7b] [--tflops 600] [--json out.json]
//   npx tsx bench/gpu-model.ts --backend emu --shape tiny
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { PROJECTIONS, type ResolvedLayer, type ResolvedSpec } from '../dsl/resolved.ts';
import { loadSpecOrFail } from '../compiler/spec-file.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { loadNativeOps } from '../runtime/model/native-ops.ts';
import type { BackendName, LlamaConfig, LlamaWeights, ProjectionName, QuantLinear } from '../runtime/model/types.ts';
import { DEFAULT_CUDA_ARCHS } from '../dsl/defaults.ts';
import { splitmix32 } from '../runtime/random.ts';
import { f32ToF16Bits } from '../runtime/safetensors.ts';
import { AdamW } from '../runtime/train/adamw.ts';
import { BackendAdamW } from '../runtime/train/backend-adamw.ts';
import { paramList } from '../runtime/train/params.ts';

const { values: o } = parseArgs({
  options: {
    backend: { type: 'string', default: 'cuda' },
    shape: { type: 'string', default: 'llama7b' },
    spec: { type: 'string', default: 'specs/llama2-7b.qal' },
    arch: { type: 'string' },
    tflops: { type: 'string' },
    steps: { type: 'string', default: '32' },
    json: { type: 'string' },
  },
});
const backend = o.backend as BackendName;
if (backend !== 'cuda' && backend !== 'emu') throw new Error(`--backend must be cuda or emu, got ${o.backend}`);

const base = loadSpecOrFail(o.spec!);
const shape: LlamaConfig = o.shape === 'tiny'
  ? { dim: 128, hidden: 352, layers: 2, heads: 4, kvHeads: 4, vocab: 512, context: 256, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true }
  : { ...base.model!, tiedClassifier: true };
const seqLen = o.shape === 'tiny' ? 64 : 2048;
const archs = o.arch ? [o.arch] : base.targets.cuda?.archs ?? [...DEFAULT_CUDA_ARCHS];

/** The spec's adapter settings on this shape's projections. */
function specFor(c: LlamaConfig): ResolvedSpec {
  const kv = (c.dim / c.heads) * c.kvHeads;
  const io: Record<ProjectionName, [number, number]> = { q: [c.dim, c.dim], k: [c.dim, kv], v: [c.dim, kv], o: [c.dim, c.dim], gate: [c.dim, c.hidden], up: [c.dim, c.hidden], down: [c.hidden, c.dim] };
  const s = base.layers[0];
  return {
    ...base,
    name: `${base.name}_${o.shape}`,
    model: { ...c },
    layers: PROJECTIONS.map((p) => ({ ...s, name: p, projection: p, inFeatures: io[p][0], outFeatures: io[p][1], count: c.layers }) as ResolvedLayer),
    targets: { cpu: true, cuda: { archs } },
  };
}

function randomWeights(c: LlamaConfig, spec: ResolvedSpec): LlamaWeights {
  let seed = 1;
  const u32 = (n: number) => {
    const a = new Uint32Array(n);
    let s = splitmix32(seed++);
    for (let i = 0; i < n; i++) a[i] = s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return a;
  };
  const f32 = (n: number, scale: number, offset = 0) => {
    const bits = u32(n), a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = offset + scale * (bits[i] / 2 ** 31 - 1);
    return a;
  };
  const half = (n: number, scale: number, offset: number) => Uint16Array.from(f32(n, scale, offset), f32ToF16Bits);
  const layer = (p: ProjectionName): QuantLinear => {
    const l = spec.layers.find((x) => x.name === p)!;
    const groups = (l.inFeatures / l.group) * l.outFeatures, words = (Math.ceil(l.inFeatures / 32) * l.bits) * l.outFeatures;
    const settings = { bits: l.bits, group: l.group, rank: l.rank, alpha: l.alpha, dropout: l.dropout, pool: l.pool, dtype: l.dtype, scales: l.scales ?? 'fp32' } as QuantLinear['settings'];
    const scales = settings.scales === 'fp16' ? [half(groups, 0.001, 0.002), half(groups, 0.002, -0.015)] : [f32(groups, 0.001, 0.002), f32(groups, 0.002, -0.015)];
    return { kind: 'quant', out: l.outFeatures, in: l.inFeatures, settings, qweight: u32(words), alpha: scales[0], beta: scales[1] };
  };
  const table = f32(c.vocab * c.dim, 0.02);
  return {
    config: c,
    tokEmbedding: table,
    classifier: table,
    finalNorm: new Float32Array(c.dim).fill(1),
    blocks: Array.from({ length: c.layers }, () => ({
      attnNorm: new Float32Array(c.dim).fill(1),
      ffnNorm: new Float32Array(c.dim).fill(1),
      proj: Object.fromEntries(PROJECTIONS.map((p) => [p, layer(p)])) as Record<ProjectionName, QuantLinear>,
    })),
  };
}

const spec = specFor(shape);
const weights = randomWeights(shape, spec);
const t0 = performance.now();
const model = await LlamaModel.create(weights, { backend, spec });
const native = await loadNativeOps(spec, backend); // the model's own addon (each build loads once)
const addon = native.addon;
const dev = native.device!;
console.log(`MODEL shape=${o.shape} backend=${backend} dim=${shape.dim} layers=${shape.layers} vocab=${shape.vocab} load_s=${((performance.now() - t0) / 1000).toFixed(1)}`);

const results: Array<Record<string, unknown>> = [];
const report = (r: Record<string, unknown>) => {
  results.push(r);
  console.log('RESULT ' + Object.entries(r).map(([k, v]) => `${k}=${typeof v === 'number' ? +v.toPrecision(4) : v}`).join(' '));
};
const counters = (op: string, m: number, run: () => void) => {
  if (!addon.emuCounters) return;
  run(); // warm
  addon.emuResetCounters!();
  run();
  const c = addon.emuCounters();
  console.log(`COUNTERS op=${op} m=${m} h2dCalls=${c.h2dCalls} h2dBytes=${c.h2dBytes} d2hCalls=${c.d2hCalls} d2hBytes=${c.d2hBytes} d2dCalls=${c.d2dCalls} syncs=${c.syncs} allocs=${c.allocs} frees=${c.frees} launches=${c.launches}`);
};

// Yardstick: device-to-device copy of 1 GiB (64 MiB on the emulator), reads plus writes.
const copyBytes = backend === 'cuda' ? 1 << 30 : 1 << 26;
const [ca, cb] = [dev.alloc('u8', copyBytes), dev.alloc('u8', copyBytes)];
cb.copyFrom(ca);
dev.sync();
let t = performance.now();
const reps = backend === 'cuda' ? 10 : 2;
for (let i = 0; i < reps; i++) cb.copyFrom(ca);
dev.sync();
const copyGBps = (2 * copyBytes * reps) / ((performance.now() - t) / 1000) / 1e9;
ca.release();
cb.release();
report({ op: 'copy', GBps: copyGBps });

// Bytes a decode step must read: every base weight, the adapters and the fp32 classifier.
let stepBytes = 4 * shape.vocab * shape.dim;
for (const b of weights.blocks) for (const p of PROJECTIONS) {
  const l = b.proj[p] as QuantLinear;
  stepBytes += l.qweight.byteLength + l.alpha.byteLength + l.beta.byteLength;
}
for (const set of model.adapters) for (const ad of Object.values(set)) stepBytes += ad!.a.byteLength + ad!.b.byteLength;
const roofline = (copyGBps * 1e9) / stepBytes;

const argmax = (a: Float32Array) => a.reduce((best, v, i) => (v > a[best] ? i : best), 0);
const steps = Number(o.steps);
for (const batch of [1, 8]) {
  const sessions = Array.from({ length: batch }, () => model.newSession());
  let ids = sessions.map((s, i) => argmax(s.prefill(Array.from({ length: 16 }, (_, j) => (i * 31 + j * 7 + 1) % shape.vocab))));
  const step = () => (ids = model.stepBatch(sessions, ids).map(argmax));
  counters('decode', batch, step);
  for (let i = 0; i < 3; i++) step();
  t = performance.now();
  for (let i = 0; i < steps; i++) step();
  const tokS = (batch * steps) / ((performance.now() - t) / 1000);
  report({ op: 'decode', shape: o.shape, batch, tokS, roofline: roofline * batch, vs: tokS / (roofline * batch), of: 'bandwidth' });
}

// A training step as the trainer takes it on a GPU backend: forward, recompute and backward at seqLen tokens
// (6·params·tokens flops), the gradient norm and AdamW, all on the device.
const tokens = Int32Array.from({ length: seqLen + 1 }, (_, i) => (i * 13 + 5) % shape.vocab);
const on = model.trainingOnBackend()!;
const opt = new BackendAdamW(on, new AdamW(paramList(model.adapters)));
const trainStep = () => {
  const r = on.lossAndGrad(tokens.subarray(0, -1), tokens.subarray(1), 1, seqLen, { training: true, seed: 1 });
  const norm = Math.sqrt(on.core.sum_squares(r.grads, on.params.length)) / r.count;
  opt.step(r.grads, 1e-4, Math.min(1, 0.3 / norm) / r.count);
};
counters('train', seqLen, trainStep);
trainStep();
t = performance.now();
const trainReps = backend === 'cuda' ? 3 : 1;
for (let i = 0; i < trainReps; i++) trainStep();
const stepS = (performance.now() - t) / 1000 / trainReps;
let params = 0;
for (const b of weights.blocks) for (const p of PROJECTIONS) params += b.proj[p].in * b.proj[p].out;
params += shape.vocab * shape.dim;
const tflops = (6 * params * seqLen) / stepS / 1e12;
const peak = o.tflops ? Number(o.tflops) : 0;
report({ op: 'train_step', shape: o.shape, seqLen, s: stepS, tokS: seqLen / stepS, TFLOPs: tflops, vs: peak ? tflops / peak : 0, of: peak ? 'cublas' : 'none' });
console.log(`POOL ${Object.entries(dev.stats()).map(([k, v]) => `${k}=${v}`).join(' ')}`);
if (o.json) writeFileSync(o.json, JSON.stringify({ shape: o.shape, backend, copyGBps, results }, null, 2) + '\n');
