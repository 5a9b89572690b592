// The CPU GEMV with int8 activations (`--activations int8`) against the float64 reference that models the
// activation quantization (runtime/reference/qalora.ts forwardInt8): every bits, scale storage and activation
// dtype of the kernel grid whose group is whole 32-blocks, for the row counts the GEMV takes (up to 16: one pass
// of 8 rows, two, a remainder), in the AVX2 and the portable build. Where the mode does not apply (more rows than the GEMV takes, groups not a multiple of 32) the
// flag changes nothing, bit for bit.
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadKernels, type KernelSet, type LayerCallArgs } from '../runtime/native.ts';
import { decodeAct } from '../runtime/reference/numeric.ts';
import * as ref from '../runtime/reference/qalora.ts';
import { absLayer, type ActData, compare, emptyAct, gridId, kernelGrid, layerData, randomAct, randoms, storeEps, type GridCase, GRID_LOAD } from './kernel-grid.ts';

const grid = kernelGrid();
let cpu: Record<string, KernelSet>;

beforeAll(async () => {
  cpu = (await loadKernels(grid.spec, GRID_LOAD)).kernels.cpu!;
});

afterEach(() => {
  delete process.env.QALORA_CPU_ISA;
});

const abs = (a: ArrayLike<number>) => Float64Array.from(a, Math.abs);

function run(c: GridCase, args: LayerCallArgs, x: ActData): Float64Array | Float32Array {
  const y = emptyAct(c, args.m * c.out);
  cpu[c.id].forward(args, x.stored, y);
  return decodeAct(y, c.dtype);
}

const cases = (rows: number[], pick: (c: GridCase) => boolean) =>
  grid.keys.map((k) => grid.cases.find((g) => g.id === gridId(k))!).filter(pick).flatMap((c) => rows.map((m) => ({ ...c, m })));
const whole32 = (c: GridCase) => c.group % 32 === 0;

for (const isa of ['avx2', 'portable'] as const) {
  describe(`int8 activations against the modelled reference (${isa} build)`, () => {
    // The portable build on a subset: it is scalar and the grid is large.
    const rows = isa === 'avx2' ? [1, 2, 3, 4, 8, 13, 16] : [1, 3, 9];
    const pick = isa === 'avx2' ? whole32 : (c: GridCase) => whole32(c) && c.dtype === 'fp32';
    for (const c of cases(rows, pick)) {
      it(`${c.id} in=${c.in} out=${c.out} m=${c.m} rank=${c.rank}`, () => {
        if (isa === 'portable') process.env.QALORA_CPU_ISA = 'portable';
        const d = layerData(c, 300 + c.m);
        const x = randomAct(c, c.m * c.in, randoms(301 + c.m));
        const got = run(c, { ...d.native, int8Activations: true }, x);
        const bound = ref.forwardInt8(absLayer(d.ref), abs(x.values));
        expect(compare('y', got, ref.forwardInt8(d.ref, x.values), bound, storeEps(c.dtype))).toBe('');
        // …and it is the int8 mode that ran: the exact fp32 result is further away than rounding explains.
        if (c.dtype === 'fp32') expect(compare('y', got, ref.forward(d.ref, x.values), bound, storeEps(c.dtype))).not.toBe('');
      });
    }
  });
}

describe('int8 activations where the mode does not apply', () => {
  const gemm = cases([17], (c) => c.bits === 4 || c.bits === 8); // past the GEMV's 16 rows
  const odd = cases([1, 3], (c) => !whole32(c));
  for (const c of [...gemm, ...odd]) {
    it(`${c.id} m=${c.m}: the flag changes nothing`, () => {
      const d = layerData(c, 400);
      const x = randomAct(c, c.m * c.in, randoms(401));
      const exact = run(c, d.native, x);
      const flagged = run(c, { ...d.native, int8Activations: true }, x);
      expect(Buffer.from(flagged.buffer).equals(Buffer.from(exact.buffer))).toBe(true);
    });
  }
});

describe('int8 activations: the activation quantization itself', () => {
  it('follows qalora_common.h: d = max|x|/127, x_q = rint(x/d), zero blocks stay zero', () => {
    const x = new Float32Array(64);
    for (let i = 0; i < 32; i++) x[i] = (i - 16) / 8; // max |x| = 2 at i = 0
    const { q, d } = ref.quantizeActivations(x, 1, 64);
    expect(d[0]).toBe(Math.fround(2 / 127));
    expect(q[0]).toBe(-127);
    expect(q[16]).toBe(0);
    for (let i = 0; i < 32; i++) expect(Math.abs(q[i] * d[0] - x[i])).toBeLessThanOrEqual((d[0] / 2) * (1 + 1e-6));
    expect(d[1]).toBe(0);
    expect(Array.from(q.subarray(32))).toEqual(new Array(32).fill(0));
  });
  it('the backward ignores the flag (training never runs int8)', () => {
    const c = { ...cases([3], (g) => g.id === 'b4_g32_fp32_mean')[0] };
    const d = layerData(c, 500, { training: true });
    const x = randomAct(c, c.m * c.in, randoms(501));
    const dy = randomAct(c, c.m * c.out, randoms(502));
    const grads = (args: LayerCallArgs) => {
      const dx = emptyAct(c, c.m * c.in);
      const gA = new Float32Array(c.rank * (c.in / c.group));
      const gB = new Float32Array(c.out * c.rank);
      cpu[c.id].backward(args, x.stored, dy.stored, dx, gA, gB);
      return Buffer.concat([Buffer.from(dx.buffer), Buffer.from(gA.buffer), Buffer.from(gB.buffer)]);
    };
    expect(grads({ ...d.native, int8Activations: true }).equals(grads(d.native))).toBe(true);
  });
});
