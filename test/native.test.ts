// The native path with scratch templates: render → cmake-js build → load; argument checking in the generated
// wrappers; the build cache (a second build does not run cmake); the spec-independent library two specs share;
// the build lock under two concurrent builders in separate processes; and, with nvcc, a CUDA-enabled addon that
// loads without a GPU.
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BuildError, buildAddon } from '../compiler/build.ts';
import { compileAndBuild } from '../compiler/index.ts';
import { loadKernels, type NativeKernels } from '../runtime/native.ts';
import { layer, scratchTemplates, spec, tempDir, removeTempDirs } from './compiler-helpers.ts';
import { repoRoot } from './fixtures.ts';

const scratchSpec = spec('scratch', [
  layer('q'),
  layer('k', { outFeatures: 8 }),
  layer('down', { inFeatures: 172, group: 43, bits: 3, dtype: 'bf16', pool: 'sum', rank: 3 }),
]);

const args = (over: Record<string, unknown> = {}) => ({
  qweight: new Uint32Array(16 * 8),
  alpha: new Float32Array(32),
  beta: new Float32Array(32).fill(0.5),
  loraA: new Float32Array(2 * 2),
  loraB: new Float32Array(16 * 2),
  m: 3,
  in: 64,
  out: 16,
  rank: 2,
  scale: 2,
  poolScale: 1 / 32,
  dropout: 0,
  training: false,
  seed: 0,
  ...over,
});

afterAll(removeTempDirs);

describe('native addon from scratch templates', () => {
  let k: NativeKernels;
  let outDir: string;
  beforeAll(async () => {
    outDir = tempDir('native');
    k = await loadKernels(scratchSpec, { templateRoot: scratchTemplates(), outDir });
  });

  it('loads, lists its backends and says why CUDA is unavailable', () => {
    expect(k.backends()).toEqual(['cpu']);
    expect(k.cudaStatus()).toMatch(/^unavailable: .*no cuda target/);
    expect(Object.keys(k.kernels.cpu!).sort()).toEqual(['b3_g43_bf16_sum', 'b4_g32_fp32_mean']);
    expect(k.specHash).toBe(k.plan.specHash);
    expect(k.layer('k', 'cpu')).toBe(k.kernels.cpu!.b4_g32_fp32_mean);
    expect(() => k.layer('nope', 'cpu')).toThrow(/no layer 'nope'.*q, k, down/);
    expect(() => k.layer('q', 'cuda')).toThrow(/backend 'cuda' has no kernels for b4_g32_fp32_mean.*built backends: cpu/);
  });

  it('passes arguments through to the right specialization', () => {
    const f = k.kernels.cpu!.b4_g32_fp32_mean;
    const q = new Uint32Array(16 * 8), alpha = new Float32Array(32), beta = new Float32Array(32);
    f.quantize(new Float32Array(16 * 64).fill(1.5), 16, 64, q, alpha, beta);
    expect([q[0], alpha[0], beta[0]]).toEqual([4, 17.5, 64]);
    const w = new Float32Array(16 * 64);
    f.dequantize(q, alpha, beta, 16, 64, w);
    expect(w[0]).toBe(4 + 32);
    const y = new Float32Array(3 * 16);
    f.forward(args(), new Float32Array(3 * 64), y);
    expect(y[0]).toBe(3 * 1000 + 2 + 2);
    const betaOut = new Float32Array(32);
    f.merge(args({ training: true, seed: 7n }), betaOut);
    expect(betaOut[0]).toBe(0.5 + 1 + 7);
    const down = k.kernels.cpu!.b3_g43_bf16_sum;
    const yb = new Uint16Array(5 * 16);
    down.forward(args({ m: 5, in: 172, rank: 3, qweight: new Uint32Array(16 * 18), alpha: new Float32Array(64), beta: new Float32Array(64), loraA: new Float32Array(12), loraB: new Float32Array(48) }), new Uint16Array(5 * 172), yb);
    expect(yb[0]).toBe(8);
    expect([down.bits, down.group]).toEqual([3, 43]);
  });

  it('rejects wrong arrays with a TypeError naming the argument and the expected length', () => {
    const f = k.kernels.cpu!.b4_g32_fp32_mean;
    expect(() => f.forward(args(), new Float32Array(3 * 64 - 1), new Float32Array(48))).toThrow(
      new TypeError("cpu.b4_g32_fp32_mean.forward: argument 'x' must be a Float32Array of length 192 (m*in = 3*64), got Float32Array of length 191"),
    );
    expect(() => f.forward(args(), new Uint16Array(192) as never, new Float32Array(48))).toThrow(/argument 'x' must be a Float32Array .* got Uint16Array/);
    expect(() => f.forward(args({ alpha: new Float32Array(31) }), new Float32Array(192), new Float32Array(48))).toThrow(/argument 'args.alpha' must be a Float32Array of length 32 \(out\*\(in\/g\) = 16\*2\)/);
    expect(() => f.forward(args({ loraB: undefined }), new Float32Array(192), new Float32Array(48))).toThrow(/argument 'args.loraB' must be a Float32Array of length 32 .* got undefined/);
    expect(() => f.forward(args({ in: 48 }), new Float32Array(144), new Float32Array(48))).toThrow(/in = 48 is not a multiple of the group size 32/);
    expect(() => f.forward(args({ m: 1.5 }), new Float32Array(192), new Float32Array(48))).toThrow(/'args.m' must be an integer/);
    expect(() => f.backward(args(), new Float32Array(192), new Float32Array(48), new Float32Array(192), new Float32Array(4), new Float32Array(31))).toThrow(/argument 'gradB' must be a Float32Array of length 32/);
    expect(() => (f.merge as (...a: unknown[]) => void)(args())).toThrow(/merge: expected 2 arguments, got 1/);
    const bf = k.kernels.cpu!.b3_g43_bf16_sum;
    expect(() => bf.quantize(new Float32Array(16 * 172), 16, 172, new Uint32Array(16 * 18 - 1), new Float32Array(64), new Float32Array(64))).toThrow(/argument 'qweight' must be a Uint32Array of length 288/);
  });

  it('generates core-op wrappers from the descriptors, lengths included', () => {
    // The scratch templates' own ops, not the runtime's (runtime/native-api.ts types those).
    const core = k.core as unknown as Record<'sum_f32' | 'fill_u16', (...a: unknown[]) => number>;
    expect(core.sum_f32(new Float32Array([1, 2, 3.5]), 3)).toBe(6.5);
    expect(() => core.sum_f32(new Float32Array(3), 4)).toThrow(new TypeError("core.sum_f32: argument 'x' must be a Float32Array of length 4 (n), got Float32Array of length 3"));
    const y = new Uint16Array(4);
    core.fill_u16(y, 4, 9); // no len in the descriptor: any length
    expect([...y]).toEqual([9, 9, 9, 9]);
    expect(() => core.fill_u16(new Float32Array(4), 4, 9)).toThrow(/core.fill_u16: argument 'y' must be a Uint16Array, got Float32Array/);
  });

  it('a second build is a cache hit that runs no cmake and leaves the addon untouched', async () => {
    const before = statSync(k.addonPath).mtimeMs;
    const lines: string[] = [];
    const r = await buildAddon(outDir, { onOutput: (l) => lines.push(l) });
    expect(r.cached).toBe(true);
    expect(lines).toEqual([]);
    expect(statSync(k.addonPath).mtimeMs).toBe(before);
    // An unchanged compile rewrites nothing, so the cache still hits after it.
    const again = await loadKernels(scratchSpec, { templateRoot: scratchTemplates(), outDir });
    expect(again.cached).toBe(true);
  });
});

describe('spec-independent sources, built once per content', () => {
  it('two specs link one archive, built by the first; a build told not to use it compiles those sources itself', async () => {
    const root = scratchTemplates(), cache = tempDir('shared-cache');
    const build = (name: string, bits: 2 | 3 | 4, sharedCache: string | false) =>
      compileAndBuild(spec(name, [layer('q', { bits })]), tempDir(name), { templateRoot: root, sharedCache, bindings: false });
    const a = await build('shared_a', 4, cache), b = await build('shared_b', 3, cache), c = await build('shared_c', 2, false);
    expect(a.built.shared).toEqual({ dir: expect.stringContaining(cache), cached: false });
    expect(b.built.shared).toEqual({ dir: a.built.shared!.dir, cached: true });
    expect(c.built.shared).toBeNull();
    // templates/core/scratch.cpp is verbatim, so it is the archive's: each addon still runs it.
    for (const r of [a, b, c]) {
      const k = await loadKernels(r.compiled.plan.spec, { templateRoot: root, outDir: r.compiled.dir, sharedCache: r === c ? false : cache });
      expect(k.cached).toBe(true);
      expect((k.core as unknown as Record<'sum_f32', (x: Float32Array, n: number) => number>).sum_f32(new Float32Array([1, 2, 3.5]), 3)).toBe(6.5);
    }
  });
});

describe('build lock', () => {
  it('two processes loading one spec at once: one compiles and builds, the other waits and finds it built', async () => {
    const root = scratchTemplates();
    const out = tempDir('lock');
    const script = `import { loadKernels } from ${JSON.stringify(join(repoRoot, 'runtime/native.ts'))};
const k = await loadKernels(${JSON.stringify(spec('locked', [layer('a')]))}, { templateRoot: ${JSON.stringify(root)}, outDir: ${JSON.stringify(out)} });
console.log(JSON.stringify({ cached: k.cached, backends: k.backends() }));`;
    const run = () =>
      new Promise<{ code: number; out: string }>((resolve) => {
        const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: repoRoot });
        let text = '';
        child.stdout.on('data', (d) => (text += d));
        child.stderr.on('data', (d) => (text += d));
        child.on('close', (code) => resolve({ code: code ?? 1, out: text }));
      });
    const results = await Promise.all([run(), run()]);
    for (const r of results) expect(r.code, r.out).toBe(0);
    const reports = results.map((r) => JSON.parse(r.out.trim().split('\n').pop()!));
    expect(reports.map((r) => r.cached).sort()).toEqual([false, true]);
    expect(reports.map((r) => r.backends)).toEqual([['cpu'], ['cpu']]);
    // The configure ran once: both processes racing would each have configured from scratch.
    const ninjaLog = readFileSync(join(out, 'build', '.ninja_log'), 'utf8');
    expect(ninjaLog.match(/addon\.cpp\.o/g)?.length).toBe(1);
  });
});

describe('build failure', () => {
  it("surfaces the compiler's error lines, and the fixed source then builds", async () => {
    const root = scratchTemplates();
    writeFileSync(join(root, 'cpu', 'broken.cpp'), 'int broken() { return undeclared_thing_42; }\n');
    const out = tempDir('broken');
    const s = spec('broken', [layer('a')]);
    const err = await loadKernels(s, { templateRoot: root, outDir: out }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(BuildError);
    expect((err as Error).message).toMatch(/build failed in .*\n.*broken\.cpp:1:\d+: error: .undeclared_thing_42. was not declared/);
    writeFileSync(join(root, 'cpu', 'broken.cpp'), 'int broken() { return 42; }\n');
    const fixed = await loadKernels(s, { templateRoot: root, outDir: out });
    expect(fixed.cached).toBe(false);
    expect(fixed.backends()).toEqual(['cpu']);
  });
});

const haveNvcc = spawnSync('nvcc', ['--version']).status === 0;

describe('CUDA-enabled addon on a machine without a GPU', () => {
  it('builds with nvcc (or explains its absence) and reports CUDA unavailable without crashing', async () => {
    const cudaSpec = spec('scratch_cuda', [layer('a', { dtype: 'fp16' })], ['sm_80']);
    const opts = { templateRoot: scratchTemplates({ cuda: true }), outDir: tempDir('cuda'), noCuda: false };
    const k = await loadKernels(cudaSpec, opts);
    // A caller that does not need CUDA is served by the build that has it, without a rebuild.
    expect((await loadKernels(cudaSpec, { ...opts, noCuda: true })).cached).toBe(true);
    if (haveNvcc) {
      expect(k.backends()).toEqual(['cpu', 'cuda']);
      expect(Object.keys(k.kernels.cuda!)).toEqual(['b4_g32_fp16_mean']);
      // No driver here: any cudaGetDeviceCount error means unavailable (a real GPU would say "ok: …").
      expect(k.cudaStatus()).toMatch(/^(unavailable: |ok: .*, sm_\d+)/);
      // cudart is linked statically: the addon needs no libcudart.so to load.
      const ldd = spawnSync('ldd', [k.addonPath], { encoding: 'utf8' });
      expect(ldd.stdout).not.toMatch(/libcudart/);
    } else {
      expect(k.backends()).toEqual(['cpu']);
      expect(k.cudaStatus()).toMatch(/^unavailable: .*nvcc was not found/);
    }
  });
});
