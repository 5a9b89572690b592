// `npm run bench`: the CPU QA-LoRA kernels on LLaMA-7B layer shapes, against rooflines measured in the same
// run. M = 1 (decode) is bandwidth-bound: effective GB/s = bytes of q, α, β read ÷ time, compared with a
// read-bandwidth probe. M = 512 (training/prefill) is compute-bound: GFLOP/s compared with an fp32 GEMM of the
// same shape through the same engine (dense W already in fp32: the best the dequantizing GEMM could do).
// Then the GEMV's modes at M = 1 and 4, rank 0: fp32 against fp16 α/β (`scales fp16`: 2 bits per weight fewer at
// g 32) and fp16 α/β with int8 activations (`--activations int8`), timed in alternating rounds so a busy machine
// slows all alike; medians reported.
// Options: QALORA_BENCH_QUICK=1 runs one shape; QALORA_THREADS sets the thread count; --gemv runs only the GEMV table.
import type { ResolvedLayer, ResolvedSpec, ScaleDType } from '../dsl/resolved.ts';
import { poolScale } from '../dsl/resolved.ts';
import { loadKernels, type KernelSet, type LayerCallArgs } from '../runtime/native.ts';
import { newScales } from '../runtime/model/scales.ts';
import { wordsPerRow } from '../runtime/reference/numeric.ts';
import type { CoreOps } from '../runtime/model/native-ops.ts';
import { f16ToF32Array, f32ToF16Bits } from '../runtime/safetensors.ts';

interface Line {
  name: string;
  bits: 2 | 3 | 4;
  in: number;
  out: number;
}

const GROUP = 32;
const RANK = 64;
const lines: Line[] = [
  { name: 'q/k/v/o 4096→4096', bits: 4, in: 4096, out: 4096 },
  { name: 'gate/up 4096→11008', bits: 4, in: 4096, out: 11008 },
  { name: 'down 11008→4096', bits: 4, in: 11008, out: 4096 },
  { name: 'gate/up 4096→11008', bits: 3, in: 4096, out: 11008 },
  { name: 'gate/up 4096→11008', bits: 2, in: 4096, out: 11008 },
];
const quick = process.env.QALORA_BENCH_QUICK === '1';

function layer(bits: Line['bits'], scales: ScaleDType = 'fp32'): ResolvedLayer {
  return {
    name: `b${bits}${scales === 'fp16' ? '_s16' : ''}`, bits, group: GROUP, rank: RANK, alpha: 16, dropout: 0, pool: 'mean', dtype: 'fp32',
    scales, inFeatures: 4096, outFeatures: 4096, count: 1,
  };
}

function random(n: number, scale: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = (s / 2 ** 32 - 0.5) * scale;
  }
  return a;
}

/** Median wall seconds of `reps` runs after one warm-up, and the CPU seconds (all threads) one run consumed:
 * on a shared machine wall time includes waiting for a core, CPU time does not. */
function time(reps: number, fn: () => void): { wall: number; cpu: number } {
  fn();
  const t: number[] = [];
  const c0 = process.cpuUsage();
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fn();
    t.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  const c = process.cpuUsage(c0);
  return { wall: t.sort((a, b) => a - b)[Math.floor(t.length / 2)], cpu: (c.user + c.system) / 1e6 / reps };
}

const fmt = (v: number, d = 1) => v.toFixed(d).padStart(7);

async function main() {
  const bitsUsed = [...new Set(lines.map((l) => l.bits))];
  const spec: ResolvedSpec = {
    name: 'bench-kernels', file: '<bench>', layers: [...bitsUsed.map((b) => layer(b)), ...bitsUsed.map((b) => layer(b, 'fp16'))], targets: { cpu: true, cuda: null },
  };
  const k = await loadKernels(spec, { jobs: 2 });
  const threads = k.core.cpu_threads() as number;
  const bandwidth = k.core.cpu_read_bandwidth(1 << 30, 5) as number;
  console.log(`CPU kernels, ${threads} threads; read bandwidth probe: ${bandwidth.toFixed(1)} GB/s (1 GiB, best of 5)`);
  if (process.argv.includes('--gemv')) {
    await gemvModes(k.kernels.cpu!, bandwidth);
    return classifierTables(k.core);
  }
  console.log('group 32, rank 64 adapter (mean pooling) included in every forward; fp32 activations\n');
  console.log(
    'layer                 bits     M |  forward ms    GB/s  %roofline  GFLOP/s  per-core | fp32 GEMM ms  GFLOP/s  per-core  ratio | backward ms  GFLOP/s',
  );
  for (const line of quick ? lines.slice(0, 1) : lines) {
    const kernels: KernelSet = k.kernels.cpu![`b${line.bits}_g${GROUP}_fp32_mean`];
    const L = line.in / GROUP;
    const w = random(line.out * line.in, 0.1, 1);
    const qweight = new Uint32Array(line.out * wordsPerRow(line.in, line.bits));
    const alpha = new Float32Array(line.out * L);
    const beta = new Float32Array(line.out * L);
    kernels.quantize(w, line.out, line.in, qweight, alpha, beta);
    const weightBytes = qweight.byteLength + alpha.byteLength + beta.byteLength;
    for (const m of [1, 512]) {
      const args: LayerCallArgs = {
        qweight, alpha, beta, loraA: random(RANK * L, 0.1, 2), loraB: random(line.out * RANK, 0.1, 3),
        m, in: line.in, out: line.out, rank: RANK, scale: 16 / RANK, poolScale: poolScale('mean', GROUP, line.in),
        dropout: 0, training: false, seed: 1,
      };
      const x = random(m * line.in, 1, 4);
      const y = new Float32Array(m * line.out);
      const flops = 2 * m * line.in * line.out;
      const tf = time(m === 1 ? 30 : 3, () => kernels.forward(args, x, y));
      const perCore = (t: { cpu: number }) => fmt(flops / t.cpu / 1e9);
      let row = `${line.name.padEnd(20)} ${String(line.bits).padStart(4)} ${String(m).padStart(5)} | ${fmt(tf.wall * 1e3, 2)}    `;
      if (m === 1) {
        const gbs = weightBytes / tf.wall / 1e9;
        row += `${fmt(gbs)}  ${fmt((100 * gbs) / bandwidth)}%  ${fmt(flops / tf.wall / 1e9)}   ${perCore(tf)} |`;
        console.log(row);
        continue;
      }
      const tg = time(3, () => k.core.cpu_matmul_nt(x, w, y, m, line.out, line.in));
      const dy = random(m * line.out, 1, 5);
      const dx = new Float32Array(m * line.in);
      const gradA = new Float32Array(RANK * L);
      const gradB = new Float32Array(line.out * RANK);
      const tb = time(2, () => kernels.backward(args, x, dy, dx, gradA, gradB));
      row += `      -          -  ${fmt(flops / tf.wall / 1e9)}   ${perCore(tf)} | ${fmt(tg.wall * 1e3, 1)}     ${fmt(flops / tg.wall / 1e9)}   ${perCore(tg)}  ${fmt(tg.wall / tf.wall, 2)} | ${fmt(tb.wall * 1e3, 1)}    ${fmt(flops / tb.wall / 1e9)}`;
      console.log(row);
    }
  }
  await gemvModes(k.kernels.cpu!, bandwidth);
  classifierTables(k.core);
  console.log('\nGB/s counts q, α and β once per forward; ratio = fp32 GEMM time ÷ forward time (1.00 = as fast as fp32).');
  console.log('per-core = GFLOP per CPU-second consumed (all threads): comparable across runs even on a busy machine.');
  console.log('backward GFLOP/s counts the dx = dy·Ŵ GEMM only; the adapter products come on top.');
}

interface GemvMode {
  label: string;
  scales: ScaleDType;
  int8: boolean;
}
const GEMV_MODES: GemvMode[] = [
  { label: 'fp32 α/β', scales: 'fp32', int8: false },
  { label: 'fp16 α/β', scales: 'fp16', int8: false },
  { label: 'fp16 + int8 x', scales: 'fp16', int8: true },
];

/**
 * The GEMV's modes on the same weights, rounds alternating so a busy machine slows all alike; medians. Rank 0 (a
 * merged model, a GGUF file): decode's case. M = 1 is one stream; M = 4 four streams batched (time per row).
 */
async function gemvModes(cpu: Record<string, KernelSet>, bandwidth: number) {
  console.log('\nGEMV, rank 0: α/β in fp32 vs fp16 (`scales fp16`) vs fp16 with int8 activations (`--activations int8`);');
  console.log('same weights (copies filling 96 MB, called in turn: read from memory, not cache), 15 alternating rounds of 10');
  console.log('calls, medians; GB/s = bytes of q, α, β ÷ time per call');
  console.log(`layer                 bits  M | ${GEMV_MODES.map((g) => `${g.label.padStart(13)} ms    GB/s  %roof`).join(' | ')} | int8 speed-up`);
  for (const line of quick ? lines.slice(0, 1) : lines) {
    const L = line.in / GROUP;
    const w = random(line.out * line.in, 0.1, 1);
    for (const m of [1, 4]) {
      const x = random(m * line.in, 1, 4);
      const y = new Float32Array(m * line.out);
      const runs = GEMV_MODES.map((mode) => {
        const kernels: KernelSet = cpu[`b${line.bits}_g${GROUP}_fp32_mean${mode.scales === 'fp16' ? '_s16' : ''}`];
        const qweight = new Uint32Array(line.out * wordsPerRow(line.in, line.bits));
        const alpha = newScales(mode.scales, line.out * L), beta = newScales(mode.scales, line.out * L);
        kernels.quantize(w, line.out, line.in, qweight, alpha, beta);
        const args: LayerCallArgs = {
          qweight, alpha, beta, m, in: line.in, out: line.out, rank: 0, scale: 0, poolScale: poolScale('mean', GROUP, line.in),
          dropout: 0, training: false, seed: 1, int8Activations: mode.int8,
        };
        // Copies of the weights filling 96 MB, called in turn: each call then reads from memory, as decode does,
        // never from the 32 MB L3 the previous call left them in (the probe reads 1 GiB for the same reason).
        const bytes = qweight.byteLength + alpha.byteLength + beta.byteLength;
        const copies = Array.from({ length: Math.max(1, Math.ceil((96 << 20) / bytes)) }, () => ({
          ...args, qweight: qweight.slice(), alpha: alpha.slice(), beta: beta.slice(),
        }));
        let next = 0;
        return { run: () => kernels.forward(copies[next++ % copies.length], x, y), bytes, t: [] as number[] };
      });
      for (let round = 0; round < 15; round++) for (const r of runs) r.t.push(time(10, r.run).wall);
      const med = (t: number[]) => t.sort((a, b) => a - b)[Math.floor(t.length / 2)];
      const cols = runs.map((r) => {
        const t = med(r.t);
        return `${fmt(t * 1e3, 3).padStart(16)}  ${fmt(r.bytes / t / 1e9)}  ${fmt((100 * r.bytes) / t / 1e9 / bandwidth)}%`;
      });
      const speedup = med(runs[1].t) / med(runs[2].t);
      console.log(`${line.name.padEnd(20)} ${String(line.bits).padStart(4)} ${String(m).padStart(2)} | ${cols.join(' | ')} | ${fmt(speedup, 2)}x`);
    }
  }
}

/**
 * The classifier at TinyLlama's size (32 000 × 2048) with its table in fp16 (core gemm_half: a GGUF/HF F16 table
 * kept as it is stored) against the same table widened to fp32 (core gemm): half the bytes per token.
 */
function classifierTables(core: CoreOps) {
  const n = 32000, k = 2048;
  const w = Uint16Array.from(random(n * k, 1, 7), f32ToF16Bits), wf = f16ToF32Array(w);
  console.log('\nClassifier 32000×2048 (medians of 9): fp16 table (gemm_half) vs fp32 table (gemm)');
  for (const m of [1, 8]) {
    const x = random(m * k, 1, 8), y = new Float32Array(m * n);
    const median = (fn: () => void) => { fn(); const t: number[] = []; for (let r = 0; r < 9; r++) t.push(time(1, fn).wall); return t.sort((a, b) => a - b)[4]; };
    const th = median(() => core.gemm_half(x, w, y, m, n, k, true, false, false));
    const tf = median(() => core.gemm(x, wf, y, m, n, k, false, true, false));
    console.log(`  M = ${m}: fp16 ${fmt(th * 1e3, 2)} ms ${fmt((2 * n * k) / th / 1e9)} GB/s | fp32 ${fmt(tf * 1e3, 2)} ms ${fmt((4 * n * k) / tf / 1e9)} GB/s | ${fmt(tf / th, 2)}×`);
  }
}

await main();
