// The GPU core ops (templates/cuda/core.cu) run on the emulator against the CPU core ops (templates/core), which
// test/core-ops.test.ts checks against float64 references: random inputs, odd sizes that leave partial tiles,
// GQA, both RoPE layouts, masked cross-entropy rows, every gemm transpose with and without accumulate.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { nvccAvailable, nvccCompile, parsePtxas } from '../compiler/inspect.ts';
import { parseOpDescriptors } from '../compiler/ops.ts';
import { loadKernels } from '../runtime/native.ts';
import { coreFor, type CoreOps } from '../runtime/model/native-ops.ts';
import { uniformStream } from '../runtime/random.ts';

// One small layer: the spec only exists to get an addon with the emulated backend (its core ops come along).
const SPEC: ResolvedSpec = {
  name: 'core_ops_cuda', file: '<core-ops-cuda.test.ts>',
  layers: [{ name: 'l', inFeatures: 64, outFeatures: 32, count: 1, bits: 4, group: 32, rank: 2, alpha: 4, dropout: 0, dtype: 'fp32', pool: 'mean' }],
  targets: { cpu: true, cuda: { archs: ['sm_80'] } },
} as unknown as ResolvedSpec;

let cpu: CoreOps;
let emu: CoreOps;
let gpuOps: string[];
beforeAll(async () => {
  const addon = await loadKernels(SPEC, { jobs: 2, noCuda: true });
  cpu = addon.core as unknown as CoreOps;
  emu = coreFor(addon as never, 'emu');
  gpuOps = Object.keys(addon.coreOn?.emu ?? {});
}, 900_000);

const rng = uniformStream;
function rand(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => (2 * r() - 1) * scale);
}
/** max |a − b| / (1 + |b|) over the elements, naming the first index that exceeds tol. */
function expectClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string): void {
  expect(a.length, what).toBe(b.length);
  for (let i = 0; i < a.length; i++) {
    const err = Math.abs(a[i] - b[i]) / (1 + Math.abs(b[i]));
    if (!(err <= tol)) expect.fail(`${what}[${i}]: emu ${a[i]} vs cpu ${b[i]}`);
  }
}
/** Runs one op on both backends with fresh copies of the inputs; returns [emu outputs, cpu outputs]. */
function both<T extends readonly unknown[]>(make: () => T, call: (ops: CoreOps, args: T) => unknown): [T, T, unknown, unknown] {
  const e = make(), c = make();
  const re = call(emu, e), rc = call(cpu, c);
  return [e, c, re, rc];
}

describe('GPU core ops on the emulator match the CPU core ops', () => {
  it('exposes every op of core.ops.json and optim.ops.json on the emu backend (but the half-table ops), the fp16/bf16 casts included', () => {
    const declared = ['core', 'optim'].flatMap((f) => JSON.parse(readFileSync(new URL(`../templates/core/${f}.ops.json`, import.meta.url), 'utf8')) as Array<{ name: string; cuda?: boolean }>);
    expect(gpuOps.sort()).toEqual(declared.filter((d) => d.cuda).map((d) => d.name).sort());
    // CPU only, by design: a GPU runner holds a half token table in fp32 (runtime/model/runner.ts)
    expect(declared.filter((d) => !d.cuda).map((d) => d.name).sort()).toEqual(['embedding_forward_half', 'gemm_half']);
    expect(emu.gemm).not.toBe(cpu.gemm);
    expect(emu.f32_to_f16).not.toBe(cpu.f32_to_f16);
  });

  it('adamw_update: the CPU\'s bit for bit under the emulator; sum_squares within float64 rounding of it', () => {
    const n = 70_001, p0 = rand(n, 41), g = rand(n, 42, 2);
    const [e, c] = both(() => [new Float32Array(p0), rand(n, 43, 0.1), rand(n, 44, 0.1).map(Math.abs)] as const,
      (ops, [p, m, v]) => ops.adamw_update(p, g, m, v, n, 1e-3, 0.9, 0.999, 1e-8, 0.9999, 0.5, 0.19, 0.002));
    for (let i = 0; i < 3; i++) expect(Array.from(e[i]), ['p', 'm', 'v'][i]).toEqual(Array.from(c[i]));
    const [se, sc] = [emu.sum_squares(g, n), cpu.sum_squares(g, n)];
    expect(Math.abs(se - sc) / sc).toBeLessThan(1e-12);
  });

  it('fp16/bf16 casts: bit for bit the CPU\'s, rounding ties, subnormals, overflow, infinities and NaN', () => {
    const specials = [0, -0, 1, -1, 65504, 65520, 1e6, -1e6, 6e-8, 3e-8, 1e-40, Infinity, -Infinity, NaN, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8];
    const x = Float32Array.from([...specials, ...rand(1000, 77, 300)]);
    for (const [to, from] of [['f32_to_f16', 'f16_to_f32'], ['f32_to_bf16', 'bf16_to_f32']] as const) {
      const [e, c] = both(() => [x.slice(), new Uint16Array(x.length)] as const, (ops, [a, h]) => ops[to](a, h, a.length));
      expect(Array.from(e[1]), to).toEqual(Array.from(c[1]));
      const bits = Uint16Array.from({ length: 65536 }, (_, i) => i);
      const [e2, c2] = both(() => [bits.slice(), new Float32Array(bits.length)] as const, (ops, [h, y]) => ops[from](h, y, h.length));
      expect(new Uint32Array(e2[1].buffer), from).toEqual(new Uint32Array(c2[1].buffer));
    }
  });

  it('gemm: all transposes, accumulate, partial tiles', () => {
    // m ≤ 8 with transB takes the GEMV (a warp per column), m = 9 the tiles again.
    const cases: Array<[number, number, number]> = [[37, 29, 45], [70, 5, 19], [1, 67, 33], [8, 300, 129], [9, 40, 50]];
    for (const [m, n, k] of cases) {
      for (const ta of [false, true]) for (const tb of [false, true]) for (const acc of [false, true]) {
        const [e, c] = both(() => [rand(m * k, m + k), rand(k * n, n * 7 + k), rand(m * n, m * n)] as const,
          (ops, [a, b, out]) => ops.gemm(a, b, out, m, n, k, ta, tb, acc));
        expectClose(e[2], c[2], 1e-5, `gemm ${m}x${n}x${k} transA=${ta} transB=${tb} accumulate=${acc}`);
      }
    }
  });

  it('embedding forward and backward (repeated and out-of-range ids)', () => {
    const vocab = 11, dim = 37, ids = Int32Array.from([3, 0, 3, 10, -1, 11, 3, 7]), n = ids.length;
    const [ef, cf] = both(() => [rand(vocab * dim, 1), new Float32Array(n * dim).fill(9)] as const,
      (ops, [t, out]) => ops.embedding_forward(t, ids, out, n, vocab, dim));
    expectClose(ef[1], cf[1], 0, 'embedding_forward');
    const [eb, cb] = both(() => [rand(n * dim, 2), rand(vocab * dim, 3)] as const,
      (ops, [dout, dtable]) => ops.embedding_backward(ids, dout, dtable, n, vocab, dim));
    expectClose(eb[1], cb[1], 1e-6, 'embedding_backward');
  });

  it('rmsnorm forward and backward (dim wider than a block)', () => {
    const rows = 3, dim = 300;
    const x = rand(rows * dim, 4, 2), w = rand(dim, 5).map((v) => 1 + 0.3 * v);
    const [ef, cf] = both(() => [new Float32Array(rows * dim), new Float32Array(rows)] as const,
      (ops, [y, rstd]) => ops.rmsnorm_forward(x, w, y, rstd, rows, dim, 1e-5));
    expectClose(ef[0], cf[0], 1e-5, 'rmsnorm_forward y');
    expectClose(ef[1], cf[1], 1e-5, 'rmsnorm_forward rstd');
    const dy = rand(rows * dim, 6);
    const [eb, cb] = both(() => [new Float32Array(rows * dim)] as const,
      (ops, [dx]) => ops.rmsnorm_backward(x, w, cf[1], dy, dx, rows, dim));
    expectClose(eb[0], cb[0], 1e-5, 'rmsnorm_backward');
  });

  it('rope forward and backward, Meta and HF layouts, far positions', () => {
    const rows = 5, heads = 3, headDim = 10, pos = Int32Array.from([0, 1, 17, 900, 4095]);
    for (const half of [false, true]) {
      for (const dir of ['rope_forward', 'rope_backward'] as const) {
        const [e, c] = both(() => [rand(rows * heads * headDim, 7)] as const,
          (ops, [x]) => ops[dir](x, pos, rows, heads, headDim, 10000, half));
        expectClose(e[0], c[0], 2e-5, `${dir} rotateHalf=${half}`);
      }
    }
  });

  it('attention forward and backward: GQA, tq < tk, head dims below and above a warp, key tiles, split-K decode', () => {
    // [1, 1, 300, …]: decode over a long cache, its keys split across blocks and merged; [1, 20, 70, …]: several
    // query blocks and key tiles; head dim 200: more than 48 KB of shared memory (the opt-in launch).
    for (const [batch, tq, tk, heads, kvHeads, headDim] of [[2, 5, 7, 4, 2, 12], [1, 3, 3, 2, 1, 40], [1, 1, 6, 3, 3, 8], [1, 1, 300, 3, 1, 16], [2, 20, 70, 2, 2, 24], [1, 9, 40, 2, 1, 200]]) {
      const qn = batch * tq * heads * headDim, kn = batch * tk * kvHeads * headDim, what = `attention b${batch} tq${tq} tk${tk} h${heads}/${kvHeads} d${headDim}`;
      const q = rand(qn, 8, 1.5), k = rand(kn, 9, 1.5), v = rand(kn, 10);
      const [ef, cf] = both(() => [new Float32Array(qn), new Float32Array(batch * tq * heads)] as const,
        (ops, [out, lse]) => ops.attention_forward(q, k, v, out, lse, batch, tq, tk, heads, kvHeads, headDim));
      expectClose(ef[0], cf[0], 1e-5, `${what} out`);
      expectClose(ef[1], cf[1], 1e-5, `${what} lse`);
      // The fp16 KV cache's variant: the same kernel reading fp16 bits, against the CPU's widening reference.
      const [k16, v16] = [new Uint16Array(kn), new Uint16Array(kn)];
      cpu.f32_to_f16(k, k16, kn);
      cpu.f32_to_f16(v, v16, kn);
      const [eh, ch] = both(() => [new Float32Array(qn), new Float32Array(batch * tq * heads)] as const,
        (ops, [out, lse]) => ops.attention_forward_kv16(q, k16, v16, out, lse, batch, tq, tk, heads, kvHeads, headDim));
      expectClose(eh[0], ch[0], 1e-5, `${what} kv16 out`);
      expectClose(eh[1], ch[1], 1e-5, `${what} kv16 lse`);
      expectClose(ch[0], cf[0], 2e-2, `${what} kv16 vs fp32 out`); // fp16 K/V: within half precision of fp32
      const dout = rand(qn, 11);
      const [eb, cb] = both(() => [new Float32Array(qn), new Float32Array(kn).fill(5), new Float32Array(kn).fill(5)] as const,
        (ops, [dq, dk, dv]) => ops.attention_backward(q, k, v, cf[0], cf[1], dout, dq, dk, dv, batch, tq, tk, heads, kvHeads, headDim));
      expectClose(eb[0], cb[0], 1e-5, `${what} dq`);
      expectClose(eb[1], cb[1], 1e-5, `${what} dk`);
      expectClose(eb[2], cb[2], 1e-5, `${what} dv`);
    }
  });

  it('swiglu forward and backward, add_inplace', () => {
    const n = 1001, gate = rand(n, 12, 4), up = rand(n, 13), dout = rand(n, 14);
    const [ef, cf] = both(() => [new Float32Array(n)] as const, (ops, [out]) => ops.swiglu_forward(gate, up, out, n));
    expectClose(ef[0], cf[0], 1e-6, 'swiglu_forward');
    const [eb, cb] = both(() => [new Float32Array(n), new Float32Array(n)] as const,
      (ops, [dg, du]) => ops.swiglu_backward(gate, up, dout, dg, du, n));
    expectClose(eb[0], cb[0], 1e-6, 'swiglu_backward dgate');
    expectClose(eb[1], cb[1], 1e-6, 'swiglu_backward dup');
    const [ea, ca] = both(() => [rand(n, 15)] as const, (ops, [y]) => ops.add_inplace(y, up, n));
    expectClose(ea[0], ca[0], 0, 'add_inplace');
  });

  it('cross-entropy forward and backward with masked rows, dlogits aliasing logits', () => {
    const n = 5, vocab = 300, targets = Int32Array.from([4, -1, 299, 300, 0]);
    const logits = rand(n * vocab, 16, 5);
    const [, , le, lc] = both(() => [] as const, (ops) => ops.cross_entropy_forward(logits, targets, n, vocab));
    expect(Math.abs((le as number) - (lc as number))).toBeLessThan(1e-5 * (1 + Math.abs(lc as number)));
    const [e, c, be, bc] = both(() => [Float32Array.from(logits)] as const,
      (ops, [buf]) => ops.cross_entropy_backward(buf, targets, n, vocab, 0.5, buf));
    expect(Math.abs((be as number) - (bc as number))).toBeLessThan(1e-5 * (1 + Math.abs(bc as number)));
    expect(be as number).toBeCloseTo(le as number, 5);
    expectClose(e[0], c[0], 1e-6, 'cross_entropy_backward dlogits');
    expect(e[0].subarray(vocab, 2 * vocab).every((g) => g === 0)).toBe(true);
  });

  it('rejects a head dim the GPU attention cannot hold, naming it', () => {
    const hd = 260, n = hd;
    expect(() => emu.attention_forward(new Float32Array(n), new Float32Array(n), new Float32Array(n), new Float32Array(n), new Float32Array(1), 1, 1, 1, 1, 1, hd)).toThrow(/headDim ≤ 256, got 260/);
  });
});

describe('templates/cuda/core.cu under nvcc', () => {
  it('compiles for sm_80 and sm_90 with no spills and no local memory', async () => {
    expect(nvccAvailable()).toBe(true);
    const work = mkdtempSync(join(tmpdir(), 'qalora-core-cu-'));
    try {
      const r = await nvccCompile(fileURLToPath(new URL('../templates/cuda/core.cu', import.meta.url)), ['sm_80', 'sm_90'], { out: join(work, 'core.o') });
      expect(r.ok, r.log.slice(-4000)).toBe(true);
      const kernels = parsePtxas(r.log);
      for (const arch of ['sm_80', 'sm_90']) expect(kernels.filter((k) => k.arch === arch).length, arch).toBeGreaterThanOrEqual(12);
      for (const k of kernels) {
        expect(k.spillStores + k.spillLoads, `${k.mangled} ${k.arch} spills`).toBe(0);
        expect(k.stackFrame, `${k.mangled} ${k.arch} local memory`).toBe(0);
        expect(k.registers * 256, `${k.mangled} ${k.arch} register file at 256 threads`).toBeLessThanOrEqual(65536);
      }
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  }, 600_000);
});

describe('"cuda" in op descriptors', () => {
  const op = (extra: Record<string, unknown>) => [{ name: 'scale', cpp: 'qalora::core::scale', args: [{ name: 'n', type: 'i64' }], ...extra }];
  it('is carried through when true and absent otherwise', () => {
    expect(parseOpDescriptors(op({ cuda: true }), 'x.ops.json')[0].cuda).toBe(true);
    expect(parseOpDescriptors(op({}), 'x.ops.json')[0].cuda).toBeUndefined();
  });
  it('rejects a non-boolean and an op outside qalora::core, naming file, op and field', () => {
    expect(() => parseOpDescriptors(op({ cuda: 'yes' }), 'x.ops.json')).toThrow(/x\.ops\.json op scale: "cuda" must be true or false, got "yes"/);
    expect(() => parseOpDescriptors(op({ cuda: true, cpp: 'qalora::cpu::scale' }), 'x.ops.json')).toThrow(/op scale: "cuda": true needs "cpp" to be qalora::core::<fn>/);
  });
});
