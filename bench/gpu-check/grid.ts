// The kernel grid (test/kernel-grid.ts) run on the cuda and/or emu backends, each output checked against the
// float64 reference (runtime/reference/) and, when both backends ran, cuda against emu on the very same inputs,
// so a mistake shared by the generated kernels and the emulator cannot pass unnoticed.
// Usage: tsx bench/gpu-check/grid.ts --backends cuda,emu [--arch sm_90] [--tiny] [--jobs N] [--json FILE]
// Prints one `GRID …` line per (case, backend, op) and a `GRID-SUMMARY …` line; exits 1 on any failure.
import { writeFileSync } from 'node:fs';
import { loadKernels, type KernelSet } from '../../runtime/native.ts';

type Activation = Float32Array | Uint16Array;
import { kernelGrid, gridId, type GridCase } from '../../test/kernel-grid.ts';
import * as ref from '../../runtime/reference/qalora.ts';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../../runtime/reference/numeric.ts';
import { poolScale, type ActDType, type ResolvedSpec } from '../../dsl/resolved.ts';
import { newScales, scaleValues } from '../../runtime/model/scales.ts';

const argv = process.argv.slice(2);
const opt = (name: string, dflt: string) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const backends = opt('backends', 'emu').split(',') as Array<'cuda' | 'emu'>;
const arch = opt('arch', 'sm_80');
const tiny = argv.includes('--tiny');
const jobs = Number(opt('jobs', '2'));
const jsonPath = opt('json', '');

// Tolerance on max |got − want| / max |want| per output: fp16/bf16 outputs carry their own rounding.
const TOL: Record<ActDType, number> = { fp32: 1e-4, fp16: 4e-3, bf16: 2e-2 };

function tinyGrid(): { spec: ResolvedSpec; cases: GridCase[] } {
  const keys = [
    { bits: 4, group: 32, dtype: 'fp16', pool: 'mean', scales: 'fp32' },
    { bits: 3, group: 43, dtype: 'fp32', pool: 'sum', scales: 'fp32' },
    { bits: 2, group: 64, dtype: 'bf16', pool: 'peft', scales: 'fp32' },
    { bits: 4, group: 32, dtype: 'fp32', pool: 'mean', scales: 'fp16' },
  ] as const;
  const layers = keys.map((k, i) => ({ ...k, name: `l_${gridId(k)}`, inFeatures: k.group === 43 ? 172 : 128, outFeatures: 40 + i, rank: 8, alpha: 16, dropout: 0.1, count: 1 }));
  const cases: GridCase[] = [];
  layers.forEach((l, i) =>
    [1, 3, 12, 64, 520].forEach((m, j) => cases.push({ ...keys[i], id: gridId(keys[i]), layer: l.name, in: l.inFeatures, out: l.outFeatures, m, rank: [1, 8][j % 2], alpha: 16, dropout: 0.1 })),
  );
  return { spec: { name: 'gpu-check-tiny', file: '<gpu-check-tiny>', layers, targets: { cpu: false, cuda: { archs: [arch] } } }, cases };
}

function fullGrid(): { spec: ResolvedSpec; cases: GridCase[] } {
  const g = kernelGrid({ targets: { cpu: false, cuda: { archs: [arch] } }, name: 'gpu-check-grid' });
  // Rows 9..15 take the chunked GEMV path and M ≥ 512 the row-chunked dA/dB reductions, which the grid's M
  // values do not reach.
  const extra = g.cases.filter((_, i) => i % 6 === 0).map((c, i) => ({ ...c, m: i % 2 ? 600 : 12 }));
  return { spec: g.spec, cases: [...g.cases, ...extra] };
}

let seed = 0x9e3779b9;
const rnd = () => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
  return (seed / 2 ** 32) * 2 - 1;
};
const encode = (dt: ActDType, v: number[]): Activation =>
  dt === 'fp32' ? Float32Array.from(v) : Uint16Array.from(v.map(dt === 'fp16' ? f32ToF16 : f32ToBf16));
const decode = (dt: ActDType, a: Activation): number[] =>
  dt === 'fp32' ? Array.from(a as Float32Array) : Array.from(a as Uint16Array, dt === 'fp16' ? f16ToF32 : bf16ToF32);
const alloc = (dt: ActDType, n: number): Activation => (dt === 'fp32' ? new Float32Array(n) : new Uint16Array(n));

function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let err = 0, scale = 1e-30;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i] - want[i]));
    scale = Math.max(scale, Math.abs(want[i]));
  }
  return Number.isFinite(err) ? err / scale : Infinity;
}

interface Outputs { [op: string]: number[] }
interface Row { id: string; m: number; rank: number; backend: string; op: string; err: number; tol: number; ok: boolean }

function runCase(ks: KernelSet, c: GridCase, inputs: ReturnType<typeof makeInputs>): Outputs {
  const L = c.in / c.group, wpr = Math.ceil(c.in / 32) * c.bits;
  const sc = c.scales ?? 'fp32';
  const qw = new Uint32Array(c.out * wpr), al = newScales(sc, c.out * L), be = newScales(sc, c.out * L);
  ks.quantize(inputs.w, c.out, c.in, qw, al, be);
  const wd = new Float32Array(c.out * c.in);
  ks.dequantize(qw, al, be, c.out, c.in, wd);
  const args = { ...inputs.args, qweight: qw, alpha: al, beta: be };
  const y = alloc(c.dtype, c.m * c.out);
  ks.forward(args, inputs.x, y);
  const dx = alloc(c.dtype, c.m * c.in), ga = new Float32Array(c.rank * L), gb = new Float32Array(c.out * c.rank);
  ks.backward(args, inputs.x, inputs.dy, dx, ga, gb);
  const merged = newScales(sc, c.out * L);
  ks.merge(args, merged);
  // alpha/beta compare as stored (fp32 values or fp16 bits); the merge as values.
  return { qweight: Array.from(qw), alpha: Array.from(al), beta: Array.from(be), dequantize: Array.from(wd), forward: decode(c.dtype, y), dx: decode(c.dtype, dx), gradA: Array.from(ga), gradB: Array.from(gb), merge: Array.from(scaleValues(merged)) };
}

function makeInputs(c: GridCase) {
  const L = c.in / c.group;
  const w = Float32Array.from({ length: c.out * c.in }, rnd);
  const x = encode(c.dtype, Array.from({ length: c.m * c.in }, rnd));
  const dy = encode(c.dtype, Array.from({ length: c.m * c.out }, rnd));
  const args = {
    loraA: Float32Array.from({ length: c.rank * L }, rnd), loraB: Float32Array.from({ length: c.out * c.rank }, () => 0.5 * rnd()),
    m: c.m, in: c.in, out: c.out, rank: c.rank, scale: c.alpha / c.rank, poolScale: poolScale(c.pool, c.group, c.in),
    dropout: c.dropout, training: true, seed: 1234,
  };
  return { w, x, dy, args };
}

function reference(c: GridCase, inputs: ReturnType<typeof makeInputs>): Outputs {
  const q = ref.quantize(inputs.w, c.out, c.in, c.bits, c.group, c.scales ?? 'fp32');
  // The reference computes with the stored scales' values (fp16 bits widened).
  const alpha = scaleValues(q.alpha), beta = scaleValues(q.beta);
  const a = { ...inputs.args, bits: c.bits, group: c.group, pool: c.pool, qweight: q.qweight, alpha, beta };
  const x = decode(c.dtype, inputs.x), dy = decode(c.dtype, inputs.dy);
  const b = ref.backward(a, x, dy);
  return {
    qweight: Array.from(q.qweight), alpha: Array.from(q.alpha), beta: Array.from(q.beta),
    dequantize: Array.from(ref.dequantize(q.qweight, alpha, beta, c.out, c.in, c.bits, c.group)),
    forward: Array.from(ref.forward(a, x)), dx: Array.from(b.dx), gradA: Array.from(b.gradA), gradB: Array.from(b.gradB),
    // fp16 scales: the kernels round the exact merge once, as qalora_common.h says.
    merge: Array.from(ref.merge(a), (v) => (c.scales === 'fp16' ? f16ToF32(f32ToF16(v)) : v)),
  };
}

const EXACT = new Set(['qweight', 'alpha', 'beta']);  // quantization follows qalora_common.h bit for bit
const ACT_OUT = new Set(['forward', 'dx']);

async function main() {
  const { spec, cases } = tiny ? tinyGrid() : fullGrid();
  const t0 = Date.now();
  const kernels = await loadKernels(spec, { jobs, noCuda: !backends.includes('cuda') });
  console.log(`GRID-BUILD spec=${spec.name} ms=${Date.now() - t0} backends=${kernels.backends().join(',')} cuda="${kernels.cudaStatus()}"`);
  for (const b of backends)
    if (!kernels.backends().includes(b)) throw new Error(`backend ${b} was not built (${kernels.cudaStatus()})`);
  const rows: Row[] = [];
  const tAll = Date.now();
  for (const c of cases) {
    const inputs = makeInputs(c);
    const want = reference(c, inputs);
    const got: Record<string, Outputs> = {};
    for (const b of backends) got[b] = runCase(kernels.layer(c.layer, b), c, inputs);
    const compare = (label: string, out: Outputs, base: Outputs) => {
      for (const op of Object.keys(base)) {
        const err = EXACT.has(op) ? (out[op].every((v, i) => v === base[op][i]) ? 0 : Infinity) : relErr(out[op], base[op]);
        // An fp16-scale merge may round one ulp apart from the reference's (fp32 sum vs exact sum before rounding).
        const tol = EXACT.has(op) ? 0 : ACT_OUT.has(op) ? TOL[c.dtype] : op === 'merge' && c.scales === 'fp16' ? 2 ** -10 : TOL.fp32;
        const row = { id: c.id, m: c.m, rank: c.rank, backend: label, op, err, tol, ok: err <= tol };
        rows.push(row);
        if (!row.ok || process.env.QALORA_GRID_VERBOSE) console.log(`GRID ${row.ok ? 'ok  ' : 'FAIL'} backend=${label} id=${c.id} m=${c.m} rank=${c.rank} op=${op} err=${err.toExponential(2)} tol=${tol}`);
      }
    };
    for (const b of backends) compare(b, got[b], want);
    if (got.cuda && got.emu) compare('cuda-vs-emu', got.cuda, got.emu);
  }
  const labels = [...new Set(rows.map((r) => r.backend))];
  for (const l of labels) {
    const mine = rows.filter((r) => r.backend === l);
    const worst = Math.max(...mine.filter((r) => !EXACT.has(r.op)).map((r) => r.err / r.tol));
    console.log(`GRID-SUMMARY against=${l === 'cuda-vs-emu' ? 'emu' : 'reference'} backend=${l.replace('-vs-emu', '')} cases=${cases.length} checks=${mine.length} failures=${mine.filter((r) => !r.ok).length} worst_err_over_tol=${worst.toFixed(3)}`);
  }
  console.log(`GRID-TIME ms=${Date.now() - tAll}`);
  if (jsonPath) writeFileSync(jsonPath, JSON.stringify({ spec: spec.name, backends, rows }, null, 1));
  process.exitCode = rows.every((r) => r.ok) ? 0 : 1;
}

main().catch((e) => {
  console.error(`GRID-ERROR ${(e as Error).stack ?? e}`);
  process.exit(1);
});
