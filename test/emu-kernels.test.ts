// The generated CUDA kernels run unmodified under the CPU emulator (backend `emu`) over the whole kernel grid,
// against the float64 reference (runtime/reference/) and the cpu backend: quantize bit for bit, dequantize,
// forward (M = 1 … 257, inference and training), backward and merge (issue 3, "done when" point 1).
//
// Accuracy model. fp32 and the GEMV path (M ≤ the plan's gemv.maxRows) keep Ŵ in fp32: the grid's fp32
// tolerance applies as for the cpu backend. The tensor-core path (fp16/bf16 forward with more rows, and the dx
// GEMM of backward) multiplies Ŵ = α·q + β rounded to the activation type, as mma.sync requires. There the
// emulator must match the float64 reference *of that rounded Ŵ* within the fp32 tolerance — the check that the
// fragments, ldmatrix, cp.async pipeline and epilogue are right — and the exact reference and the cpu backend
// within the rounding's own bound (half an ulp of the type on every product: storeEps · Σ|x·Ŵ|).
import { beforeAll, describe, expect, it } from 'vitest';
import type { KernelPlan } from '../compiler/ir.ts';
import { loadKernels, type HostArgs, type KernelSet, type LayerCallArgs } from '../runtime/native.ts';
import { decodeAct, encodeAct } from '../runtime/reference/numeric.ts';
import * as ref from '../runtime/reference/qalora.ts';
import { newScales, scaleValues } from '../runtime/model/scales.ts';
import {
  absLayer, compare, type ActData, emptyAct, gridId, kernelGrid, layerData, type LayerData, randomAct, randomF32, randoms, storeEps,
  type GridCase, GRID_LOAD,
} from './kernel-grid.ts';

const grid = kernelGrid();
let emu: Record<string, KernelSet>;
let cpu: Record<string, KernelSet>;
let plan: KernelPlan;

beforeAll(async () => {
  const k = await loadKernels(grid.spec, GRID_LOAD);
  expect(k.backends()).toContain('emu');
  emu = k.kernels.emu!;
  cpu = k.kernels.cpu!;
  plan = k.plan;
  expect(Object.keys(emu).sort()).toEqual(grid.keys.map(gridId).sort());
}, 600_000);

const abs = (a: ArrayLike<number>) => Float64Array.from(a, Math.abs);
const caseName = (c: GridCase, extra = '') => `${c.id} in=${c.in} out=${c.out} m=${c.m} rank=${c.rank}${extra}`;

function forward(c: GridCase, k: KernelSet, args: HostArgs<LayerCallArgs>, x: ActData) {
  const y = emptyAct(c, args.m * c.out);
  k.forward(args, x.stored, y);
  return decodeAct(y, c.dtype);
}

const tensorCores = (c: GridCase) => c.dtype !== 'fp32';
const gemvMaxRows = (c: GridCase) => plan.specializations.find((s) => s.id === c.id)!.cuda!.gemv.maxRows;

/** Ŵ as the tensor-core path holds it: α·q + β in fp32, rounded to the activation type. */
function operandW(c: GridCase, d: LayerData): Float64Array {
  const w = ref.dequantize(d.native.qweight, d.ref.alpha, d.ref.beta, c.out, c.in, c.bits, c.group);
  return decodeAct(encodeAct(Float32Array.from(w), c.dtype), c.dtype);
}

/** The reference layer with the base weight removed: only the adapter path (and its dropout) remains. */
function adapterOnly(d: LayerData) {
  const zero = new Float32Array(d.native.alpha.length);
  return { ...d.ref, alpha: zero, beta: zero };
}

/** y with the rounded Ŵ: Σ_i x·Ŵr[o, i] plus the exact adapter path. */
function forwardRoundedW(c: GridCase, d: LayerData, x: Float64Array): Float64Array {
  const wr = operandW(c, d);
  const y = ref.forward(adapterOnly(d), x);
  for (let m = 0; m < c.m; m++)
    for (let o = 0; o < c.out; o++) {
      let s = 0;
      for (let i = 0; i < c.in; i++) s += x[m * c.in + i] * wr[o * c.in + i];
      y[m * c.out + o] += s;
    }
  return y;
}

/** dx with the rounded Ŵ: Σ_o dy·Ŵr[o, i] plus the exact adapter path. */
function dxRoundedW(c: GridCase, d: LayerData, x: Float64Array, dy: Float64Array): Float64Array {
  const wr = operandW(c, d);
  const dx = ref.backward(adapterOnly(d), x, dy).dx;
  for (let m = 0; m < c.m; m++)
    for (let o = 0; o < c.out; o++) {
      const g = dy[m * c.out + o];
      for (let i = 0; i < c.in; i++) dx[m * c.in + i] += g * wr[o * c.in + i];
    }
  return dx;
}

describe('quantize and dequantize on emu', () => {
  for (const key of grid.keys) {
    const c = grid.cases.find((g) => g.id === gridId(key))!;
    it(`${c.id}: quantize bit-identical to the reference, dequantize matches it`, () => {
      const w = randomF32(c.out * c.in, randoms(17), 2);
      w.fill(-0.625, 0, c.group); // a constant group
      w.fill(1e-9, c.in, c.in + c.group).fill(1.5e-9, c.in, c.in + 1); // fp16 α underflows: stored as 2^-24
      const want = ref.quantize(w, c.out, c.in, c.bits, c.group, c.scales);
      const q = new Uint32Array(want.qweight.length).fill(0xdeadbeef);
      const alpha = newScales(c.scales, want.alpha.length).fill(0x7e00);
      const beta = newScales(c.scales, want.beta.length).fill(0x7e00);
      emu[c.id].quantize(w, c.out, c.in, q, alpha, beta);
      expect(Buffer.from(q.buffer).equals(Buffer.from(want.qweight.buffer))).toBe(true);
      expect(Buffer.from(alpha.buffer).equals(Buffer.from(want.alpha.buffer))).toBe(true);
      expect(Buffer.from(beta.buffer).equals(Buffer.from(want.beta.buffer))).toBe(true);
      const wHat = new Float32Array(c.out * c.in).fill(NaN);
      emu[c.id].dequantize(q, alpha, beta, c.out, c.in, wHat);
      const av = scaleValues(alpha), bv = scaleValues(beta);
      const refHat = ref.dequantize(q, av, bv, c.out, c.in, c.bits, c.group);
      const bound = ref.dequantize(q, abs(av), abs(bv), c.out, c.in, c.bits, c.group);
      expect(compare('w_hat', wHat, refHat, bound, 0, 2 ** -23)).toBe('');
    });
  }
});

describe('forward on emu against the reference and the cpu backend', () => {
  grid.cases.forEach((c, i) => {
    const training = i % 2 === 1;
    it(caseName(c, training ? ' training (dropout 0.1)' : ''), () => {
      const d = layerData(c, 100 + i, { training });
      const x = randomAct(c, c.m * c.in, randoms(101 + i));
      const got = forward(c, emu[c.id], d.native, x);
      const bound = ref.forward(absLayer(d.ref), abs(x.values));
      const store = storeEps(c.dtype);
      if (tensorCores(c) && c.m > gemvMaxRows(c)) {
        expect(compare('y vs reference of rounded Ŵ', got, forwardRoundedW(c, d, x.values), bound, store)).toBe('');
        expect(compare('y vs reference', got, ref.forward(d.ref, x.values), bound, store, store)).toBe('');
        expect(compare('y vs cpu', got, forward(c, cpu[c.id], d.native, x), bound, 2 * store, store + 2e-5)).toBe('');
      } else {
        expect(compare('y vs reference', got, ref.forward(d.ref, x.values), bound, store)).toBe('');
        expect(compare('y vs cpu', got, forward(c, cpu[c.id], d.native, x), bound, 2 * store, 2e-5)).toBe('');
      }
    });
  });
});

describe('backward on emu against the reference (training, dropout 0.1)', () => {
  grid.cases.forEach((c, i) => {
    it(caseName(c), () => {
      const d = layerData(c, 300 + i, { training: true });
      const x = randomAct(c, c.m * c.in, randoms(301 + i));
      const dy = randomAct(c, c.m * c.out, randoms(302 + i));
      const dx = emptyAct(c, c.m * c.in);
      const gradA = new Float32Array(c.rank * (c.in / c.group)).fill(NaN);
      const gradB = new Float32Array(c.out * c.rank).fill(NaN);
      emu[c.id].backward(d.native, x.stored, dy.stored, dx, gradA, gradB);
      const want = ref.backward(d.ref, x.values, dy.values);
      const bound = ref.backward(absLayer(d.ref), abs(x.values), abs(dy.values));
      const got = decodeAct(dx, c.dtype);
      const store = storeEps(c.dtype);
      expect([
        ...(tensorCores(c)
          ? [
              compare('dx vs reference of rounded Ŵ', got, dxRoundedW(c, d, x.values, dy.values), bound.dx, store),
              compare('dx vs reference', got, want.dx, bound.dx, store, store),
            ]
          : [compare('dx', got, want.dx, bound.dx, store)]),
        compare('gradA', gradA, want.gradA, bound.gradA, storeEps('fp32')),
        compare('gradB', gradB, want.gradB, bound.gradB, storeEps('fp32')),
      ].filter(Boolean)).toEqual([]);
    });
  });
});

describe('merge on emu', () => {
  for (const key of grid.keys) {
    const c = { ...grid.cases.find((g) => g.id === gridId(key))!, m: 5, rank: 8 };
    it(`${c.id}: β' = β + s·c·B·A`, () => {
      const d = layerData(c, 700);
      const betaOut = newScales(c.scales, d.native.beta.length).fill(0x7e00);
      emu[c.id].merge(d.native, betaOut);
      // fp16 scales: exact up to the one fp16 rounding of β'
      const store = c.scales === 'fp16' ? 2 ** -11 : 2 ** -24;
      expect(compare("beta'", scaleValues(betaOut), ref.merge(d.ref), ref.merge(absLayer(d.ref)), store, 1e-6)).toBe('');
    });
  }
});
