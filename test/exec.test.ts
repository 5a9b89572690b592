// `qalora exec` end to end: tensors written to safetensors, one kernel run through the CLI on the CPU backend,
// results read back and compared with the float64 reference (runtime/reference/) — every bits value, a group
// that is not a multiple of 32, M = 1 and M > 64, all three dtypes and pooling conventions — plus the errors a
// user meets (missing tensor, wrong shape or dtype, bad flags) and the inline-layer path; and `--backend emu`
// (the CUDA kernels run by the emulator) against `--backend cpu` on the same files.
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command } from 'commander';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Bits, Pool, ResolvedLayer } from '../dsl/resolved.ts';
import { poolScale } from '../dsl/resolved.ts';
import { register } from '../runtime/cli/exec.ts';
import { decodeAct, encodeAct, type ActDType } from '../runtime/reference/numeric.ts';
import * as ref from '../runtime/reference/qalora.ts';
import { readSafetensors, tensorOf, writeSafetensors, type SafeTensor } from '../runtime/safetensors.ts';
import { uniformStream } from '../runtime/random.ts';
import { tempDir, removeTempDirs } from './compiler-helpers.ts';
import { repoRoot } from './fixtures.ts';

const SPEC = `spec exec_test {
  qalora { bits 4 group 32 rank 3 alpha 8 dropout 0 pool mean dtype fp32 }
  layer a { in 96 out 40 }
  layer b { in 172 out 24 bits 3 group 43 dtype bf16 pool sum }
  layer c { in 128 out 20 bits 2 group 64 dtype fp16 pool peft rank 1 }
  layer d { in 64 out 12 bits 8 rank 0 }
  target cpu
}
`;
type Layer = Pick<ResolvedLayer, 'name' | 'inFeatures' | 'outFeatures' | 'bits' | 'group' | 'rank' | 'alpha' | 'pool' | 'dtype'>;
const LAYERS: Layer[] = [
  { name: 'a', inFeatures: 96, outFeatures: 40, bits: 4, group: 32, rank: 3, alpha: 8, pool: 'mean', dtype: 'fp32' },
  { name: 'b', inFeatures: 172, outFeatures: 24, bits: 3, group: 43, rank: 3, alpha: 8, pool: 'sum', dtype: 'bf16' },
  { name: 'c', inFeatures: 128, outFeatures: 20, bits: 2, group: 64, rank: 1, alpha: 8, pool: 'peft', dtype: 'fp16' },
  { name: 'd', inFeatures: 64, outFeatures: 12, bits: 8, group: 32, rank: 0, alpha: 8, pool: 'mean', dtype: 'fp32' },
];
const ACT = { fp32: 'F32', fp16: 'F16', bf16: 'BF16' } as const;
/** Relative rounding of one store in the activation dtype. */
const ROUNDING = { fp32: 2 ** -23, fp16: 2 ** -11, bf16: 2 ** -8 } as const;

function rng(seed: number): () => number {
  const u = uniformStream(seed);
  return () => u() - 0.5;
}
const randoms = (n: number, seed: number, scale = 1) => {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => r() * scale);
};

const cliErrors: string[] = [];
/** Runs `qalora exec …` in this process (the addon stays loaded between calls); returns stderr and the error. */
async function exec(...argv: string[]): Promise<{ error?: string; stderr: string }> {
  const program = new Command('qalora').exitOverride();
  register(program);
  const write = process.stderr.write.bind(process.stderr);
  let stderr = '';
  process.stderr.write = ((chunk: string) => ((stderr += chunk), true)) as typeof process.stderr.write;
  try {
    await program.parseAsync(['exec', ...argv], { from: 'user' });
    return { stderr };
  } catch (e) {
    cliErrors.push((e as Error).message);
    return { error: (e as Error).message, stderr };
  } finally {
    process.stderr.write = write;
  }
}

function expectClose(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tol: (i: number) => number): void {
  expect(actual.length, `${name} length`).toBe(expected.length);
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < expected.length; i++) {
    const excess = Math.abs(actual[i] - expected[i]) - tol(i);
    if (!(excess <= worstExcess)) {
      worst = i;
      worstExcess = Number.isNaN(excess) ? Infinity : excess;
    }
  }
  if (worst >= 0) expect.fail(`${name}[${worst}] = ${actual[worst]}, reference ${expected[worst]} (tolerance ${tol(worst)})`);
}

const f32Of = (t: SafeTensor) => new Float32Array(t.data.slice().buffer);
const u32Of = (t: SafeTensor) => new Uint32Array(t.data.slice().buffer);
const actOf = (t: SafeTensor, dtype: ActDType) => decodeAct(dtype === 'fp32' ? f32Of(t) : new Uint16Array(t.data.slice().buffer), dtype);

afterAll(removeTempDirs);

describe('qalora exec on the cpu backend vs the reference', () => {
  let dir: string;
  let specFile: string;
  const io = (name: string) => join(dir, `${name}.safetensors`);

  beforeAll(() => {
    dir = tempDir('exec');
    specFile = join(dir, 'exec_test.qal');
    writeFileSync(specFile, SPEC);
  });

  for (const l of LAYERS) {
    const L = l.inFeatures / l.group;
    const scale = l.rank ? l.alpha / l.rank : 0;
    const c = poolScale(l.pool as Pool, l.group, l.inFeatures);
    const label = `layer ${l.name}: ${l.bits}-bit g${l.group} ${l.dtype} ${l.pool} r${l.rank}`;

    it(`${label}: quantize, forward, backward and merge match the reference`, async () => {
      const seed = l.name.charCodeAt(0);
      const w = randoms(l.outFeatures * l.inFeatures, seed, 0.2);
      writeSafetensors(io(`${l.name}-w`), { w: tensorOf('F32', [l.outFeatures, l.inFeatures], w) });
      const q = await exec(specFile, '--layer', l.name, '--op', 'quantize', '--in', io(`${l.name}-w`), '--out', io(`${l.name}-q`));
      expect(q.error).toBeUndefined();
      const qt = readSafetensors(io(`${l.name}-q`)).tensors;
      const expectedQ = ref.quantize(w, l.outFeatures, l.inFeatures, l.bits as Bits, l.group);
      expect(qt.get('qweight')!.shape).toEqual([l.outFeatures, Math.ceil(l.inFeatures / 32) * l.bits]);
      expect(u32Of(qt.get('qweight')!)).toEqual(expectedQ.qweight); // bit for bit: the rules are in qalora_common.h
      expect(f32Of(qt.get('alpha')!)).toEqual(expectedQ.alpha);
      expect(f32Of(qt.get('beta')!)).toEqual(expectedQ.beta);
      const wHat = ref.dequantize(expectedQ.qweight, expectedQ.alpha, expectedQ.beta, l.outFeatures, l.inFeatures, l.bits as Bits, l.group);
      expectClose('w_hat', f32Of(qt.get('w_hat')!), wHat, (i) => 2e-7 * (Math.abs(wHat[i]) + 1));

      const loraA = randoms(l.rank * L, seed + 1, 0.5);
      const loraB = randoms(l.outFeatures * l.rank, seed + 2, 0.5);
      const adapter: Record<string, SafeTensor> = l.rank ? { lora_a: tensorOf('F32', [l.rank, L], loraA), lora_b: tensorOf('F32', [l.outFeatures, l.rank], loraB) } : {};
      const weights = { qweight: qt.get('qweight')!, alpha: qt.get('alpha')!, beta: qt.get('beta')!, ...adapter };

      for (const m of [1, 70]) {
        const xs = encodeAct(randoms(m * l.inFeatures, seed + 3 + m), l.dtype as ActDType);
        const dys = encodeAct(randoms(m * l.outFeatures, seed + 4 + m), l.dtype as ActDType);
        const x = decodeAct(xs, l.dtype as ActDType);
        const dy = decodeAct(dys, l.dtype as ActDType);
        writeSafetensors(io(`${l.name}-in`), {
          ...weights,
          x: tensorOf(ACT[l.dtype], [m, l.inFeatures], xs),
          dy: tensorOf(ACT[l.dtype], [m, l.outFeatures], dys),
        });
        const args: ref.RefLayerArgs = {
          bits: l.bits as Bits, group: l.group, pool: l.pool as Pool, qweight: expectedQ.qweight, alpha: expectedQ.alpha, beta: expectedQ.beta,
          loraA, loraB, m, in: l.inFeatures, out: l.outFeatures, rank: l.rank, scale, poolScale: c, dropout: 0, training: false, seed: 0,
        };
        // fp32 accumulation over `in` terms of size ≤ |x|·|w|, then one store in the activation dtype.
        const accTol = 1e-5 * Math.sqrt(l.inFeatures);

        const f = await exec(specFile, '--layer', l.name, '--op', 'forward', '--in', io(`${l.name}-in`), '--out', io(`${l.name}-y`));
        expect(f.error).toBeUndefined();
        const yT = readSafetensors(io(`${l.name}-y`)).tensors.get('y')!;
        expect([yT.dtype, ...yT.shape]).toEqual([ACT[l.dtype], m, l.outFeatures]);
        const y = ref.forward(args, x);
        expectClose(`y (M=${m})`, actOf(yT, l.dtype as ActDType), y, (i) => ROUNDING[l.dtype] * Math.abs(y[i]) + accTol);

        const b = await exec(specFile, '--layer', l.name, '--op', 'backward', '--in', io(`${l.name}-in`), '--out', io(`${l.name}-g`));
        expect(b.error).toBeUndefined();
        const g = readSafetensors(io(`${l.name}-g`)).tensors;
        const expected = ref.backward(args, x, dy);
        expectClose(`dx (M=${m})`, actOf(g.get('dx')!, l.dtype as ActDType), expected.dx, (i) => ROUNDING[l.dtype] * Math.abs(expected.dx[i]) + accTol);
        const gradTol = 1e-5 * Math.sqrt(m * l.outFeatures);
        expectClose(`grad_lora_a (M=${m})`, f32Of(g.get('grad_lora_a')!), expected.gradA, (i) => 1e-5 * Math.abs(expected.gradA[i]) + gradTol);
        expectClose(`grad_lora_b (M=${m})`, f32Of(g.get('grad_lora_b')!), expected.gradB, (i) => 1e-5 * Math.abs(expected.gradB[i]) + gradTol);
      }

      const mg = await exec(specFile, '--layer', l.name, '--op', 'merge', '--in', io(`${l.name}-in`), '--out', io(`${l.name}-m`));
      expect(mg.error).toBeUndefined();
      const merged = readSafetensors(io(`${l.name}-m`)).tensors;
      expect(u32Of(merged.get('qweight')!)).toEqual(expectedQ.qweight); // q and α untouched, bit for bit
      expect(f32Of(merged.get('alpha')!)).toEqual(expectedQ.alpha);
      const betaRef = ref.merge({ bits: l.bits as Bits, group: l.group, pool: l.pool as Pool, qweight: expectedQ.qweight, alpha: expectedQ.alpha, beta: expectedQ.beta, loraA, loraB, m: 0, in: l.inFeatures, out: l.outFeatures, rank: l.rank, scale, poolScale: c, dropout: 0, training: false, seed: 0 });
      expectClose('merged beta', f32Of(merged.get('beta')!), betaRef, (i) => 1e-6 * (Math.abs(betaRef[i]) + 1));
    });
  }

  it('forward honours --training, --dropout and --seed like the reference', async () => {
    const l = LAYERS[0];
    const L = l.inFeatures / l.group;
    const w = randoms(l.outFeatures * l.inFeatures, 99, 0.2);
    const qz = ref.quantize(w, l.outFeatures, l.inFeatures, l.bits as Bits, l.group);
    const loraA = randoms(l.rank * L, 98), loraB = randoms(l.outFeatures * l.rank, 97);
    const m = 5;
    const x = randoms(m * l.inFeatures, 96);
    writeSafetensors(io('drop-in'), {
      qweight: tensorOf('I32', [l.outFeatures, 3 * 4], qz.qweight), alpha: tensorOf('F32', [l.outFeatures, L], qz.alpha), beta: tensorOf('F32', [l.outFeatures, L], qz.beta),
      lora_a: tensorOf('F32', [l.rank, L], loraA), lora_b: tensorOf('F32', [l.outFeatures, l.rank], loraB), x: tensorOf('F32', [m, l.inFeatures], x),
    });
    const r = await exec(specFile, '--layer', 'a', '--op', 'forward', '--training', '--dropout', '0.5', '--seed', '12345', '--in', io('drop-in'), '--out', io('drop-out'));
    expect(r.error).toBeUndefined();
    const common = { bits: l.bits as Bits, group: l.group, pool: l.pool as Pool, qweight: qz.qweight, alpha: qz.alpha, beta: qz.beta, loraA, loraB, m, in: l.inFeatures, out: l.outFeatures, rank: l.rank, scale: l.alpha / l.rank, poolScale: 1 / l.group, seed: 12345 };
    const y = ref.forward({ ...common, dropout: 0.5, training: true }, x);
    const yEval = ref.forward({ ...common, dropout: 0.5, training: false }, x);
    expect(y).not.toEqual(yEval); // dropout changes something at this size, so the comparison below means something
    expectClose('y (dropout)', f32Of(readSafetensors(io('drop-out')).tensors.get('y')!), y, () => 1e-4);
  });

  it('names the missing tensor, the wrong shape or dtype, and the bad flag', async () => {
    const l = LAYERS[0];
    writeSafetensors(io('bad-w'), { w: tensorOf('F32', [l.outFeatures, l.inFeatures - 1], new Float32Array(l.outFeatures * (l.inFeatures - 1))) });
    const run = (input: string, ...more: string[]) => exec(specFile, '--layer', 'a', '--in', io(input), '--out', io('bad-out'), ...more);
    expect((await run('bad-w', '--op', 'quantize')).error).toMatch(/tensor 'w' must be \[40, 96\] F32 .* got \[40, 95\] F32/);
    expect((await run('bad-w', '--op', 'forward')).error).toMatch(/missing tensor 'qweight' \(expected \[40, 12\] I32 or U32; the file has w\)/);
    writeSafetensors(io('bad-x'), {
      qweight: tensorOf('I32', [40, 12], new Int32Array(480)), alpha: tensorOf('F32', [40, 3], new Float32Array(120)), beta: tensorOf('F32', [40, 3], new Float32Array(120)),
      lora_a: tensorOf('F32', [3, 3], new Float32Array(9)), lora_b: tensorOf('F32', [40, 3], new Float32Array(120)), x: tensorOf('F16', [2, 96], new Uint16Array(192)),
    });
    expect((await run('bad-x', '--op', 'forward')).error).toMatch(/tensor 'x' must be \[M, 96\] F32 .* got \[2, 96\] F16/);
    expect((await run('bad-x', '--op', 'backward')).error).toMatch(/tensor 'x' must be/);
    expect((await run('bad-x', '--op', 'frobnicate')).error).toMatch(/--op must be one of quantize, forward, backward, merge, got 'frobnicate'/);
    expect((await run('bad-x', '--op', 'forward', '--backend', 'tpu')).error).toMatch(/--backend must be one of cpu, cuda, emu/);
    expect((await run('nonexistent', '--op', 'forward')).error).toMatch(/nonexistent\.safetensors: cannot read/);
    expect((await exec(specFile, '--layer', 'zz', '--op', 'forward', '--in', io('bad-x'), '--out', io('o'))).error).toMatch(/no layer 'zz' \(layers: a, b, c, d\)/);
    expect((await exec(specFile, '--layer', 'a', '--op', 'forward', '--backend', 'cuda', '--in', io('bad-x'), '--out', io('o'))).error).toMatch(/backend cuda needs a cuda target/);
    // Inline flags are checked before anything is built.
    const inline = (...f: string[]) => exec('--op', 'forward', '--in', io('bad-x'), '--out', io('o'), ...f);
    expect((await inline('--in-features', '100', '--out-features', '4', '--bits', '4', '--group', '32', '--rank', '1', '--alpha', '1', '--dtype', 'fp32')).error).toMatch(/--group 32 does not divide --in-features 100; valid group sizes: 1, 2, 4, 5, 10, 20, 25, 50, 100/);
    expect((await inline('--in-features', '64', '--out-features', '4', '--bits', '5', '--group', '32', '--rank', '1', '--alpha', '1', '--dtype', 'fp32')).error).toMatch(/--bits must be one of 2, 3, 4, 8, got '5'/);
    expect((await inline('--in-features', '64', '--bits', '4', '--group', '32', '--rank', '1', '--alpha', '1', '--dtype', 'fp32')).error).toMatch(/--out-features is required/);
  });

  it('runs an inline layer (compiled on demand into generated/cache/<key>/) like the same layer of a spec', async () => {
    const l = LAYERS[0];
    const w = randoms(l.outFeatures * l.inFeatures, 7, 0.2);
    writeSafetensors(io('inline-w'), { w: tensorOf('F32', [l.outFeatures, l.inFeatures], w) });
    const r = await exec('--op', 'quantize', '--in', io('inline-w'), '--out', io('inline-q'), '--in-features', '96', '--out-features', '40', '--bits', '4', '--group', '32', '--rank', '3', '--alpha', '8', '--dtype', 'fp32');
    expect(r.error).toBeUndefined();
    expect(r.stderr).toMatch(/quantize on cpu\/b4_g32_fp32_mean: wrote qweight, alpha, beta, w_hat/);
    const out = readSafetensors(io('inline-q'));
    expect(out.metadata).toMatchObject({ op: 'quantize', backend: 'cpu', kernel: 'b4_g32_fp32_mean' });
    expect(u32Of(out.tensors.get('qweight')!)).toEqual(ref.quantize(w, 40, 96, 4, 32).qweight);
  });

  it('the qalora binary prints the tensor table in --help and exits 1 on a bad input', () => {
    const help = spawnSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'exec', '--help'], { encoding: 'utf8', cwd: repoRoot });
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/quantize\s+w \[out,in\] F32\s+qweight/);
    expect(help.stdout).toMatch(/backward\s+forward's inputs, dy \[M,out\] ACT\s+dx \[M,in\] ACT, grad_lora_a/);
    const bad = spawnSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'exec', '--op', 'forward', '--in', join(dir, 'none.safetensors'), '--out', join(dir, 'o.safetensors'), '--in-features', '64', '--out-features', '4', '--bits', '4', '--group', '33', '--rank', '1', '--alpha', '1', '--dtype', 'fp32'], { encoding: 'utf8', cwd: repoRoot });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^qalora: --group 33 does not divide --in-features 64/m);
    expect(bad.stderr).not.toMatch(/\n\s+at /); // a user error prints no stack
  });
});

describe('qalora exec --backend emu (the generated CUDA run on the CPU) vs --backend cpu', () => {
  let dir: string;
  const io = (name: string) => join(dir, `${name}.safetensors`);
  beforeAll(() => {
    dir = tempDir('exec-emu');
  });

  // fp32 activations: the CUDA kernels take their fp32 SIMT path, so both backends compute in fp32.
  const cases = [
    { label: '4-bit g32', flags: ['--in-features', '96', '--out-features', '40', '--bits', '4', '--group', '32'], in: 96, out: 40, g: 32 },
    { label: '3-bit g43', flags: ['--in-features', '172', '--out-features', '24', '--bits', '3', '--group', '43'], in: 172, out: 24, g: 43 },
  ];
  for (const c of cases) {
    it(`${c.label}: quantize bit for bit; forward, backward and merge at M = 1 and 70 within fp32 rounding`, async () => {
      const layer = [...c.flags, '--rank', '3', '--alpha', '8', '--dtype', 'fp32'];
      const run = async (backend: string, op: string, input: string) => {
        const out = io(`${c.g}-${op}-${backend}`);
        const r = await exec('--backend', backend, '--op', op, '--in', io(input), '--out', out, ...layer);
        expect(r.error, `${backend} ${op}`).toBeUndefined();
        return readSafetensors(out).tensors;
      };
      const same = (name: string, emu: SafeTensor, cpu: SafeTensor) => {
        const [e, k] = [f32Of(emu), f32Of(cpu)];
        expectClose(name, e, k, (i) => 1e-5 * (Math.abs(k[i]) + 1));
      };
      writeSafetensors(io(`${c.g}-w`), { w: tensorOf('F32', [c.out, c.in], randoms(c.out * c.in, c.g, 0.2)) });
      const [qe, qc] = [await run('emu', 'quantize', `${c.g}-w`), await run('cpu', 'quantize', `${c.g}-w`)];
      for (const t of ['qweight', 'alpha', 'beta']) expect(qe.get(t)!.data, t).toEqual(qc.get(t)!.data);
      const L = c.in / c.g;
      for (const m of [1, 70]) {
        writeSafetensors(io(`${c.g}-in`), {
          qweight: qc.get('qweight')!, alpha: qc.get('alpha')!, beta: qc.get('beta')!,
          lora_a: tensorOf('F32', [3, L], randoms(3 * L, m + 1, 0.5)), lora_b: tensorOf('F32', [c.out, 3], randoms(c.out * 3, m + 2, 0.5)),
          x: tensorOf('F32', [m, c.in], randoms(m * c.in, m + 3)), dy: tensorOf('F32', [m, c.out], randoms(m * c.out, m + 4)),
        });
        const [ye, yc] = [await run('emu', 'forward', `${c.g}-in`), await run('cpu', 'forward', `${c.g}-in`)];
        same(`y (M=${m})`, ye.get('y')!, yc.get('y')!);
        const [ge, gc] = [await run('emu', 'backward', `${c.g}-in`), await run('cpu', 'backward', `${c.g}-in`)];
        for (const t of ['dx', 'grad_lora_a', 'grad_lora_b']) same(`${t} (M=${m})`, ge.get(t)!, gc.get(t)!);
      }
      const [me, mc] = [await run('emu', 'merge', `${c.g}-in`), await run('cpu', 'merge', `${c.g}-in`)];
      expect(me.get('qweight')!.data).toEqual(mc.get('qweight')!.data);
      same('merged beta', me.get('beta')!, mc.get('beta')!);
    });
  }
});
