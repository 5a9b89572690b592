// The CPU kernels against the float64 reference (runtime/reference/) over the kernel grid: quantize bit for bit,
// every other op within tolerances derived from fp32 accumulation and the activation dtype's rounding; the
// native backward against finite differences of the native forward; merge exactness; dropout consistency;
// the portable (non-AVX2) build on a subset.
import { beforeAll, describe, expect, it } from 'vitest';
import { loadKernels, type HostArgs, type KernelSet, type LayerCallArgs } from '../runtime/native.ts';
import { decodeAct } from '../runtime/reference/numeric.ts';
import * as ref from '../runtime/reference/qalora.ts';
import { newScales, scaleValues } from '../runtime/model/scales.ts';
import {
  absLayer, compare, type ActData, emptyAct, gridId, kernelGrid, layerData, randomAct, randomF32, randoms, storeEps, type GridCase, GRID_LOAD,
} from './kernel-grid.ts';

const grid = kernelGrid();
let cpu: Record<string, KernelSet>;

beforeAll(async () => {
  const k = await loadKernels(grid.spec, GRID_LOAD);
  cpu = k.kernels.cpu!;
  expect(Object.keys(cpu).sort()).toEqual(grid.keys.map(gridId).sort());
  for (const key of grid.keys) expect(cpu[gridId(key)].scales).toBe(key.scales);
});

const abs = (a: ArrayLike<number>) => Float64Array.from(a, Math.abs);
const caseName = (c: GridCase, extra = '') => `${c.id} in=${c.in} out=${c.out} m=${c.m} rank=${c.rank}${extra}`;

function runForward(c: GridCase, k: KernelSet, args: HostArgs<LayerCallArgs>, x: ActData) {
  const y = emptyAct(c, args.m * c.out);
  k.forward(args, x.stored, y);
  return decodeAct(y, c.dtype);
}

function checkForward(c: GridCase, training: boolean, seed: number): string {
  const d = layerData(c, seed, { training });
  const x = randomAct(c, c.m * c.in, randoms(seed + 1));
  const got = runForward(c, cpu[c.id], d.native, x);
  const want = ref.forward(d.ref, x.values);
  const bound = ref.forward(absLayer(d.ref), abs(x.values));
  return compare('y', got, want, bound, storeEps(c.dtype));
}

function checkBackward(c: GridCase, seed: number): string[] {
  const d = layerData(c, seed, { training: true });
  const x = randomAct(c, c.m * c.in, randoms(seed + 1));
  const dy = randomAct(c, c.m * c.out, randoms(seed + 2));
  const dx = emptyAct(c, c.m * c.in);
  const gradA = new Float32Array(c.rank * (c.in / c.group)).fill(NaN);
  const gradB = new Float32Array(c.out * c.rank).fill(NaN);
  cpu[c.id].backward(d.native, x.stored, dy.stored, dx, gradA, gradB);
  const want = ref.backward(d.ref, x.values, dy.values);
  const bound = ref.backward(absLayer(d.ref), abs(x.values), abs(dy.values));
  return [
    compare('dx', decodeAct(dx, c.dtype), want.dx, bound.dx, storeEps(c.dtype)),
    compare('gradA', gradA, want.gradA, bound.gradA, storeEps('fp32')),
    compare('gradB', gradB, want.gradB, bound.gradB, storeEps('fp32')),
  ].filter(Boolean);
}

describe('quantize and dequantize', () => {
  for (const key of grid.keys) {
    const c = grid.cases.find((g) => g.id === gridId(key))!;
    it(`${c.id}: quantize is bit-identical to the reference, dequantize matches it`, () => {
      const w = randomF32(c.out * c.in, randoms(7), 2);
      w.fill(0.375, 0, c.group); // a constant group: α = 1, q = 0
      for (let i = c.in; i < c.in + c.group; i++) w[i] = i % 2 ? -1.25 : 3.5; // two values: q ∈ {0, qmax}
      w.fill(1e-9, 2 * c.in, 2 * c.in + c.group).fill(1.5e-9, 2 * c.in, 2 * c.in + 1); // fp16 α underflows: 2^-24
      const want = ref.quantize(w, c.out, c.in, c.bits, c.group, c.scales);
      const q = new Uint32Array(want.qweight.length).fill(0xdeadbeef);
      const alpha = newScales(c.scales, want.alpha.length).fill(0x7e00);
      const beta = newScales(c.scales, want.beta.length).fill(0x7e00);
      cpu[c.id].quantize(w, c.out, c.in, q, alpha, beta);
      expect(Buffer.from(q.buffer).equals(Buffer.from(want.qweight.buffer))).toBe(true);
      expect(Buffer.from(alpha.buffer).equals(Buffer.from(want.alpha.buffer))).toBe(true);
      expect(Buffer.from(beta.buffer).equals(Buffer.from(want.beta.buffer))).toBe(true);
      const wHat = new Float32Array(c.out * c.in);
      cpu[c.id].dequantize(q, alpha, beta, c.out, c.in, wHat);
      const av = scaleValues(alpha), bv = scaleValues(beta);
      const refHat = ref.dequantize(q, av, bv, c.out, c.in, c.bits, c.group);
      const bound = ref.dequantize(q, abs(av), abs(bv), c.out, c.in, c.bits, c.group);
      expect(compare('w_hat', wHat, refHat, bound, 0, 2 ** -23)).toBe('');
      // Round to nearest against the stored scales: at most half a step, plus (fp16 scales) what rounding α and
      // β moved the ends of the grid: 2^-11·(|β| + qmax·α) (qalora_common.h).
      const qmax = 2 ** c.bits - 1;
      for (let i = 0; i < w.length; i++) {
        const k = Math.floor(i / c.group), a = av[k];
        const ends = c.scales === 'fp16' ? 2 ** -11 * (Math.abs(bv[k]) + qmax * a) * (1 + 2 ** -10) : 0;
        expect(Math.abs(wHat[i] - w[i])).toBeLessThanOrEqual(a * 0.5 * (1 + 1e-5) + ends + 1e-6);
      }
    });
  }
});

describe('forward against the reference', () => {
  grid.cases.forEach((c, i) => {
    const training = i % 2 === 1;
    it(caseName(c, training ? ' training (dropout 0.1)' : ''), () => {
      expect(checkForward(c, training, 100 + i)).toBe('');
    });
  });
});

describe('the 4-bit fp32 GEMV (gemv_q4.h): two blocks per load, every pass size, an odd last block', () => {
  // The grid's 4-bit specializations at the GEMV's row counts (passes of 4 rows: 1–4, 5, 8, a remainder,
  // 16) and at in = 288 for group 32: nine blocks, so the last one goes through the single-block tail.
  const b4 = grid.keys.filter((k) => k.bits === 4 && k.group % 32 === 0).map((k) => grid.cases.find((g) => g.id === gridId(k))!);
  for (const c0 of b4)
    for (const m of [1, 2, 3, 4, 5, 8, 11, 16]) {
      const c = { ...c0, m, in: c0.group === 32 ? 288 : c0.in, rank: m % 2 ? c0.rank : 0 };
      it(caseName(c), () => expect(checkForward(c, false, 700 + m)).toBe(''));
    }
  // in = 2080 (32 spans and an odd block): from 3 rows of x on, x no longer fits the GEMV's L1 slice (16 KB), so
  // each tile of output rows walks the inputs in slices and carries its sums between them; out = 37 leaves a
  // tile whose rows do not pair up (two output rows at a time from 3 rows of x on).
  for (const c0 of b4.filter((c) => c.group === 32))
    for (const m of [1, 3, 4, 8, 16]) {
      const c = { ...c0, m, in: 2080, out: 37, rank: m % 2 ? c0.rank : 0 };
      it(`${caseName(c)} (inputs walked in slices)`, () => expect(checkForward(c, false, 800 + m)).toBe(''));
    }
});

describe('backward against the reference (training, dropout 0.1)', () => {
  grid.cases.forEach((c, i) => {
    it(caseName(c), () => {
      expect(checkBackward(c, 300 + i)).toEqual([]);
    });
  });
});

describe('backward by finite differences of the native forward', () => {
  // Linear in each of x, A and B for a fixed dropout mask, so central differences are exact up to fp32 rounding;
  // they agree only if backward recomputes the very mask forward used.
  const picks: Array<Partial<GridCase> & { id: string }> = [
    { id: 'b4_g32_fp32_mean', m: 3, rank: 8 }, // GEMV path
    { id: 'b4_g64_fp32_peft', m: 64, rank: 8 }, // GEMM path, dropout before pooling
    { id: 'b3_g43_fp32_mean', m: 65, rank: 4 }, // a group that is not a multiple of 32
  ];
  for (const pick of picks) {
    const base = grid.cases.find((g) => g.id === pick.id)!;
    const c: GridCase = { ...base, ...pick };
    it(caseName(c), () => {
      const d = layerData(c, 500, { training: true });
      const x = Float32Array.from(randomF32(c.m * c.in, randoms(501)));
      const g = randomF32(c.m * c.out, randoms(502));
      const k = cpu[c.id];
      const loss = () => {
        const y = new Float32Array(c.m * c.out);
        k.forward(d.native, x, y);
        return y.reduce((s, v, i) => s + v * g[i], 0);
      };
      const dx = new Float32Array(c.m * c.in);
      const gradA = new Float32Array(c.rank * (c.in / c.group));
      const gradB = new Float32Array(c.out * c.rank);
      k.backward(d.native, x, g, dx, gradA, gradB);
      const rnd = randoms(503);
      const h = 0.05;
      const probe = (name: string, t: Float32Array, grad: Float32Array) => {
        for (let n = 0; n < 12; n++) {
          const i = Math.floor(((rnd() + 1) / 2) * t.length);
          const keep = t[i];
          t[i] = keep + h;
          const up = loss();
          t[i] = keep - h;
          const down = loss();
          t[i] = keep;
          const fd = (up - down) / (2 * h);
          expect(Math.abs(fd - grad[i]), `${name}[${i}]: finite difference ${fd}, backward ${grad[i]}`).toBeLessThan(5e-3 * (1 + Math.abs(fd)));
        }
      };
      probe('x', x, dx);
      probe('A', d.native.loraA!, gradA);
      probe('B', d.native.loraB!, gradB);
    });
  }
});

describe('merge', () => {
  for (const key of grid.keys) {
    const c = { ...grid.cases.find((g) => g.id === gridId(key))!, m: 5, rank: 8 };
    // fp16 scales: β' is the fp32 sum rounded once to fp16, so it is exact up to that half ulp (2^-11), and the
    // merged forward differs from the unmerged one by at most that rounding times Σ|x| per group.
    const scaleEps = c.scales === 'fp16' ? 2 ** -11 : 2 ** -24;
    it(`${c.id}: β' = β + s·c·B·A; merged forward equals unmerged forward; q and α untouched`, () => {
      const d = layerData(c, 700);
      const q0 = d.native.qweight.slice();
      const alpha0 = d.native.alpha.slice();
      const betaOut = newScales(c.scales, d.native.beta.length).fill(0x7e00);
      cpu[c.id].merge(d.native, betaOut);
      expect(Buffer.from(d.native.qweight.buffer).equals(Buffer.from(q0.buffer))).toBe(true);
      expect(Buffer.from(d.native.alpha.buffer).equals(Buffer.from(alpha0.buffer))).toBe(true);
      expect(compare("beta'", scaleValues(betaOut), ref.merge(d.ref), ref.merge(absLayer(d.ref)), scaleEps, 1e-6)).toBe('');

      const x = randomAct(c, c.m * c.in, randoms(701));
      const unmerged = runForward(c, cpu[c.id], d.native, x);
      const mergedArgs = { ...d.native, beta: betaOut, rank: 0, scale: 0, loraA: undefined, loraB: undefined };
      const merged = runForward(c, cpu[c.id], mergedArgs, x);
      const bound = ref.forward(absLayer(d.ref), abs(x.values));
      const accEps = c.scales === 'fp16' ? 2 ** -11 + 1e-6 : 1e-6;
      expect(compare('merged y', merged, unmerged, bound, 2 * storeEps(c.dtype), accEps)).toBe('');
    });
  }
});

describe('dropout', () => {
  const c: GridCase = { ...grid.cases.find((g) => g.id === 'b4_g32_fp32_mean')!, m: 64, rank: 8, dropout: 0.3 };
  it('forward draws the same mask for the same seed and another for another seed; inference ignores it', () => {
    const d = layerData(c, 900, { training: true });
    const x = randomAct(c, c.m * c.in, randoms(901));
    const a = runForward(c, cpu[c.id], d.native, x);
    const b = runForward(c, cpu[c.id], d.native, x);
    const other = runForward(c, cpu[c.id], { ...d.native, seed: d.native.seed as number + 1 }, x);
    const inference = runForward(c, cpu[c.id], { ...d.native, training: false }, x);
    expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer))).toBe(true);
    expect(a.some((v, i) => v !== other[i])).toBe(true);
    expect(compare('y (inference)', inference, ref.forward({ ...d.ref, training: false }, x.values), ref.forward(absLayer(d.ref), abs(x.values)), 2 ** -24)).toBe('');
  });
  it('the pooled input is dropped at the requested rate', () => {
    // With A = identity-like (rank = groups) and B picking one hidden unit, y isolates one pooled entry.
    const L = c.in / c.group;
    const d = layerData({ ...c, rank: L }, 902, { training: true, rank: L });
    d.native.loraA!.fill(0);
    for (let j = 0; j < L; j++) d.native.loraA![j * L + j] = 1;
    d.native.beta.fill(0);
    d.native.alpha.fill(0);
    const x = new Float32Array(c.m * c.in).fill(1);
    let dropped = 0;
    for (let j = 0; j < L; j++) {
      d.native.loraB!.fill(0);
      d.native.loraB![j] = 1; // output 0 reads hidden unit j
      const y = new Float32Array(c.m * c.out);
      cpu[c.id].forward(d.native, x, y);
      for (let r = 0; r < c.m; r++) if (y[r * c.out] === 0) dropped++;
    }
    expect(dropped / (c.m * L)).toBeGreaterThan(0.2);
    expect(dropped / (c.m * L)).toBeLessThan(0.4);
  });
});

describe('portable build (QALORA_CPU_ISA=portable)', () => {
  const picks = grid.cases.filter((c, i) => i % 7 === 0 || (c.scales === 'fp16' && i % 2 === 0));
  for (const c of picks) {
    it(caseName(c), () => {
      process.env.QALORA_CPU_ISA = 'portable';
      try {
        const w = randomF32(c.out * c.in, randoms(1000));
        const want = ref.quantize(w, c.out, c.in, c.bits, c.group, c.scales);
        const q = new Uint32Array(want.qweight.length);
        const alpha = newScales(c.scales, want.alpha.length);
        const beta = newScales(c.scales, want.beta.length);
        cpu[c.id].quantize(w, c.out, c.in, q, alpha, beta);
        expect([q, alpha, beta].map((a) => Buffer.from(a.buffer).toString('base64'))).toEqual(
          [want.qweight, want.alpha, want.beta].map((a) => Buffer.from(a.buffer).toString('base64')),
        );
        expect(checkForward(c, true, 1100)).toBe('');
        expect(checkBackward(c, 1200)).toEqual([]);
      } finally {
        delete process.env.QALORA_CPU_ISA;
      }
    });
  }
});
