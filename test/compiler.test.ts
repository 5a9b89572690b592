// The compiler stages without a native build: plan (dedupe, configs, hash), render (determinism, per-target
// context, verbatim copies, stale files), op descriptors, manifest and the emitted bindings (checked by tsc).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { compileSpec } from '../compiler/index.ts';
import { parseOpDescriptors } from '../compiler/ops.ts';
import { canonicalJson, planSpec, specHash, specializationId } from '../compiler/plan.ts';
import { renderSources } from '../compiler/render.ts';
import { poolScale } from '../dsl/resolved.ts';
import { layer, scratchTemplates, spec, tempDir, removeTempDirs } from './compiler-helpers.ts';
import { repoRoot } from './fixtures.ts';

const pkgVersion = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')).version;

const mixed = spec(
  'mixed',
  [
    layer('q', { count: 5 }),
    layer('k', { count: 5, outFeatures: 8 }),
    layer('down', { inFeatures: 172, group: 43, bits: 3, dtype: 'bf16', pool: 'sum', rank: 0 }),
    layer('up', { rank: 8, alpha: 16 }),
    layer('o', { dtype: 'fp16' }),
  ],
  ['sm_80', 'sm_90a'],
);

afterAll(removeTempDirs);

describe('plan', () => {
  it('deduplicates identical (bits, group, dtype, pool) keys and maps every layer to its specialization', () => {
    const plan = planSpec(mixed);
    const ids = plan.specializations.map((s) => s.id);
    expect(new Set(ids).size).toBe(ids.length);
    // The expected set, derived from the layers independently of the planner.
    const keys = new Set(mixed.layers.map((l) => `b${l.bits}_g${l.group}_${l.dtype}_${l.pool}`));
    expect(new Set(ids)).toEqual(keys);
    for (const l of mixed.layers) {
      const planned = plan.layers.find((p) => p.name === l.name)!;
      const s = plan.specializations.find((x) => x.id === planned.specialization)!;
      expect([s.bits, s.group, s.dtype, s.pool]).toEqual([l.bits, l.group, l.dtype, l.pool]);
      expect(s.layers).toContain(l.name);
      expect(planned.scale).toBe(l.rank ? l.alpha / l.rank : 0);
      expect(planned.poolScale).toBe(poolScale(l.pool, l.group, l.inFeatures));
      expect(planned.count).toBe(l.count);
    }
    expect(plan.specializations.find((s) => s.id === 'b4_g32_fp32_mean')!.layers).toEqual(['q', 'k', 'up']);
    expect(specializationId({ bits: 8, group: 128, dtype: 'bf16', pool: 'peft', scales: 'fp32' })).toBe('b8_g128_bf16_peft');
    // fp16 scales are a specialization of their own; fp32 ones keep the id they always had
    expect(specializationId({ bits: 4, group: 32, dtype: 'fp32', pool: 'mean', scales: 'fp16' })).toBe('b4_g32_fp32_mean_s16');
  });

  it('chooses CPU blocking and CUDA tiles per specialization', () => {
    const plan = planSpec(mixed);
    for (const s of plan.specializations) {
      const cpu = s.cpu!;
      expect(cpu.fastPath).toBe(s.group % 32 === 0);
      expect(cpu.kc % s.group).toBe(0); // a panel never splits a group
      expect(cpu.mc).toBeGreaterThan(0);
      expect(cpu.gemvMaxRows).toBeGreaterThanOrEqual(1);
      const cuda = s.cuda!;
      expect(cuda.archs).toEqual(['sm_80', 'sm_90a']);
      expect(cuda.gemm.bk % 16).toBe(0); // mma.sync m16n8k16 steps
      expect(cuda.gemm.bm % 16).toBe(0);
      expect(cuda.gemm.bn % 8).toBe(0);
      expect(cuda.gemm.smemBytes).toBeLessThanOrEqual(99 * 1024); // the opt-in limit of every sm_80+ part
      expect(cuda.gemv.maxRows).toBeLessThan(16); // tensor cores from M = 16
      expect(cuda.maxRegisters).toBeLessThanOrEqual(255);
    }
    // fp32 activations take more shared memory than 16-bit ones at the same tile.
    const by = (id: string) => plan.specializations.find((s) => s.id === id)!.cuda!.gemm;
    expect(by('b4_g32_fp32_mean').bk).toBe(by('b4_g32_fp16_mean').bk);
    expect(by('b4_g32_fp32_mean').smemBytes).toBeGreaterThan(by('b4_g32_fp16_mean').smemBytes);
    // Worked example (fp16, bits 4, 64×128×32, 3 stages): x 3·64·(32+8)·2 + W 128·(32+8)·2 + q 3·128·1·4·4
    // = 15360 + 10240 + 6144 = 31744 < the epilogue: fp32 output tile 64·132·4 = 33792 plus the adapter's h and
    // B chunks (64 + 128)·17·4 = 13056, so 46848.
    expect(by('b4_g32_fp16_mean').smemBytes).toBe(46848);
  });

  it('leaves out the configs of targets the spec does not have', () => {
    const plan = planSpec({ ...mixed, targets: { cpu: false, cuda: null } });
    expect(plan.specializations.every((s) => s.cpu === null && s.cuda === null)).toBe(true);
  });

  it('hashes the spec content canonically: key order and file path do not matter, content does', () => {
    const reordered = JSON.parse(canonicalJson(mixed));
    reordered.file = '/elsewhere/mixed.qal';
    const shuffled = { targets: reordered.targets, layers: reordered.layers.map((l: object) => Object.fromEntries(Object.entries(l).reverse())), name: reordered.name, file: reordered.file };
    expect(specHash(shuffled)).toBe(specHash(mixed));
    expect(planSpec(mixed).specHash).toMatch(/^[0-9a-f]{64}$/);
    const changed = { ...mixed, layers: mixed.layers.map((l, i) => (i === 0 ? { ...l, rank: 3 } : l)) };
    expect(specHash(changed)).not.toBe(specHash(mixed));
    expect(planSpec(mixed).compilerVersion).toBe(pkgVersion);
  });
});

describe('render', () => {
  it('is deterministic and renders each target with its own specializations', () => {
    const root = scratchTemplates({ cuda: true });
    mkdirSync(join(root, 'cpu', 'sub'));
    writeFileSync(join(root, 'cpu', 'sub', 'ids.txt.njk'), '{% for s in specializations %}{{ s.id }}\n{% endfor %}');
    writeFileSync(join(root, 'cpu', 'verbatim.h'), '// {{ not a template }}\n');
    const cpuOnly = spec('r', [layer('a'), layer('b', { bits: 2 })]);
    const plan = planSpec(mixed);
    const a = renderSources(plan, '9.9.9', { templateRoot: root });
    const b = renderSources(planSpec(JSON.parse(JSON.stringify(mixed))), '9.9.9', { templateRoot: root });
    expect(b.files).toEqual(a.files);

    const file = (r: typeof a, p: string) => r.files.find((f) => f.path === p)?.content;
    expect(file(a, 'src/cpu/sub/ids.txt')).toBe(plan.specializations.map((s) => s.id).join('\n') + '\n');
    expect(file(a, 'src/cpu/verbatim.h')).toBe('// {{ not a template }}\n');
    expect(file(a, 'src/common/qalora_common.h')).toBe(readFileSync(join(repoRoot, 'templates/common/qalora_common.h'), 'utf8'));
    expect(a.files.some((f) => f.path.endsWith('.njk') || f.path.endsWith('.ops.json'))).toBe(false);
    for (const s of plan.specializations) expect(file(a, 'src/cuda/kernels.cu')).toContain(`namespace qalora::cuda::${s.id} {`);
    expect(a.backends).toEqual(['cpu', 'cuda']); // no emu: the scratch root has no templates/emu

    const cmake = file(a, 'CMakeLists.txt')!;
    expect(cmake).toContain('set(CMAKE_CUDA_ARCHITECTURES "80;90a")');
    expect(cmake).toContain('-Xptxas -warn-spills,-warn-lmem-usage,-Werror');
    expect(cmake).toContain('CUDA::cudart_static');
    expect(JSON.parse(file(a, 'package.json')!).binary).toEqual({ napi_versions: [8] });

    // Without a cuda target nothing of CUDA is rendered and the addon says why.
    const c = renderSources(planSpec(cpuOnly), '9.9.9', { templateRoot: root });
    expect(c.files.some((f) => f.path.startsWith('src/cuda/'))).toBe(false);
    expect(c.backends).toEqual(['cpu']);
    expect(file(c, 'CMakeLists.txt')).toContain('the spec has no cuda target');
    expect(file(c, 'src/addon/addon.cpp')).toContain('QL_KERNEL_ENTRY(cpu, b2_g32_fp32_mean, 2, 32, F32, F32)');
  });

  it('names the template when one fails to render', () => {
    const root = scratchTemplates();
    writeFileSync(join(root, 'cpu', 'broken.cpp.njk'), '{% for s in %}');
    expect(() => renderSources(planSpec(mixed), '1', { templateRoot: root })).toThrow(/templates\/cpu\/broken\.cpp\.njk/);
  });

  it('renders the real templates of the LLaMA-2-7B-shaped spec', () => {
    const llama = spec('llama', ['q', 'k', 'v', 'o', 'gate', 'up', 'down'].map((p) => layer(p, { inFeatures: p === 'down' ? 11008 : 4096, outFeatures: 4096, rank: 64, alpha: 16, dtype: 'fp16', count: 32 })), ['sm_80', 'sm_90']);
    const r = renderSources(planSpec(llama), pkgVersion);
    expect(r.files.find((f) => f.path === 'src/addon/addon.cpp')!.content).toContain('b4_g32_fp16_mean');
    expect(r.files.find((f) => f.path === 'CMakeLists.txt')).toBeDefined();
  });
});

describe('op descriptors', () => {
  const ok = { name: 'f', cpp: 'qalora::core::f', args: [{ name: 'x', type: 'f32[]', len: 'n * 2' }, { name: 'n', type: 'i64' }], returns: 'void' };
  it('accepts a valid descriptor', () => {
    expect(parseOpDescriptors([ok], 'x.ops.json')[0].args[0].len).toBe('n * 2');
  });
  it.each([
    [{ ...ok, args: [{ name: 'x', type: 'float' }] }, /x\.ops\.json op f arg 0: "x" has type "float"; expected one of f32\[\]/],
    [{ ...ok, cpp: 'f' }, /"cpp" must be a namespaced C\+\+ function name/],
    [{ ...ok, returns: 'i32' }, /"returns" must be "void" or "f64"/],
    [{ ...ok, args: [{ name: 'x', type: 'f32[]', len: 'm' }, { name: 'n', type: 'i64' }] }, /len "m" names "m", which is not an integer scalar argument/],
    [{ ...ok, args: [{ name: 'n', type: 'i64', const: true }] }, /"const"\/"len" apply to array arguments only/],
  ])('rejects a bad descriptor naming the file, op and field (%#)', (bad, message) => {
    expect(() => parseOpDescriptors([bad], 'x.ops.json')).toThrow(message);
  });
});

describe('compileSpec', () => {
  it('writes the manifest and only rewrites what changed; removed templates leave no stale sources', async () => {
    const root = scratchTemplates();
    const out = tempDir('compile');
    const first = await compileSpec(mixed, out, { templateRoot: root, bindings: false });
    const manifest = JSON.parse(readFileSync(join(out, 'manifest.json'), 'utf8'));
    expect(manifest.specHash).toBe(specHash(mixed));
    expect(manifest.compilerVersion).toBe(pkgVersion);
    expect(manifest.kernels.map((k: { id: string }) => k.id)).toEqual(first.plan.specializations.map((s) => s.id));
    const k = manifest.kernels.find((x: { id: string }) => x.id === 'b3_g43_bf16_sum');
    expect(k).toMatchObject({ bits: 3, group: 43, dtype: 'bf16', pool: 'sum', fastPath: false, layers: ['down'], ops: ['quantize', 'dequantize', 'forward', 'backward', 'merge'] });
    expect(k.cpu.kc % 43).toBe(0);
    expect(manifest.layers.down).toMatchObject({ specialization: 'b3_g43_bf16_sum', inFeatures: 172, rank: 0, scale: 0, poolScale: 1 });
    expect(manifest.coreOps).toEqual(['sum_f32', 'fill_u16']);
    expect(manifest.files).toContain('src/addon/addon.cpp');

    const again = await compileSpec(mixed, out, { templateRoot: root, bindings: false });
    expect(again.changed).toEqual([]);

    writeFileSync(join(root, 'cpu', 'extra.cpp'), '// extra\n');
    await compileSpec(mixed, out, { templateRoot: root, bindings: false });
    expect(readFileSync(join(out, 'CMakeLists.txt'), 'utf8')).toContain('${QL_SRC}/cpu/extra.cpp');
    rmSync(join(root, 'cpu', 'extra.cpp'));
    await compileSpec(mixed, out, { templateRoot: root, bindings: false });
    expect(existsSync(join(out, 'src/cpu/extra.cpp'))).toBe(false);
    expect(readFileSync(join(out, 'CMakeLists.txt'), 'utf8')).not.toContain('extra.cpp');
  });

  it('emits bindings that typecheck with tsc, with exact types per specialization and core op', async () => {
    const root = scratchTemplates();
    // Inside the repository so tsc finds @types/node; removed afterwards.
    const out = join(repoRoot, 'generated', `.test-bindings-${process.pid}`);
    try {
      await compileSpec(mixed, out, { templateRoot: root });
      writeFileSync(
        join(out, 'use.ts'),
        `import { loadAddon, specializationIds, type Addon } from './bindings.ts';
const addon: Addon = loadAddon('/nonexistent.node');
const cpu = addon.kernels.cpu!;
const y32: Float32Array = new Float32Array(4);
cpu.b4_g32_fp32_mean.forward({ qweight: new Uint32Array(1), alpha: new Float32Array(1), beta: new Float32Array(1), m: 1, in: 64, out: 16, rank: 0, scale: 0, poolScale: 1, dropout: 0, training: false, seed: 1n }, y32, y32);
cpu.b4_g32_fp16_mean.merge({ qweight: new Uint32Array(1), alpha: new Float32Array(1), beta: new Float32Array(1), m: 1, in: 64, out: 16, rank: 0, scale: 0, poolScale: 1, dropout: 0, training: false, seed: 1 }, y32);
const total: number = addon.core.sum_f32(y32, 4);
addon.core.fill_u16(new Uint16Array(2), 2, 7);
const ids: readonly string[] = specializationIds;
const status: string = addon.cudaStatus();
const uploaded: number | undefined = addon.emuCounters?.().h2dBytes;
// @ts-expect-error the counters are exactly those of compiler/emu-counters.ts
addon.emuCounters?.().uploads;
// @ts-expect-error fp16 activations are Uint16Array bits, not Float32Array
cpu.b4_g32_fp16_mean.forward({} as never, y32, y32);
// @ts-expect-error core ops have exact signatures
addon.core.sum_f32(y32);
// @ts-expect-error no such specialization
cpu.b5_g32_fp32_mean;
export { total, ids, status, uploaded };
`,
      );
      const tsc = spawnSync(process.execPath, [join(repoRoot, 'node_modules/typescript/bin/tsc'), '--noEmit', '--strict', '--target', 'ES2022', '--module', 'NodeNext', '--moduleResolution', 'NodeNext', '--allowImportingTsExtensions', '--types', 'node', '--skipLibCheck', join(out, 'use.ts')], { cwd: repoRoot, encoding: 'utf8' });
      expect(tsc.stdout + tsc.stderr).toBe('');
      expect(tsc.status).toBe(0);
      // The bindings carry the hash of their inputs and are reused without ts-morph when unchanged.
      const again = await compileSpec(mixed, out, { templateRoot: root });
      expect(again.changed).toEqual([]);
      expect(again.timings.bindingsMs).toBeGreaterThanOrEqual(0);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

describe('qalora compile', () => {
  async function compileCli(...argv: string[]): Promise<{ error?: string; stdout: string; stderr: string }> {
    const { Command } = await import('commander');
    const { register } = await import('../runtime/cli/compile.ts');
    const program = new Command('qalora').exitOverride();
    register(program);
    let stdout = '';
    let stderr = '';
    const [out, err] = [process.stdout.write.bind(process.stdout), process.stderr.write.bind(process.stderr)];
    process.stdout.write = ((c: string) => ((stdout += c), true)) as typeof process.stdout.write;
    process.stderr.write = ((c: string) => ((stderr += c), true)) as typeof process.stderr.write;
    try {
      await program.parseAsync(['compile', ...argv], { from: 'user' });
      return { stdout, stderr };
    } catch (e) {
      return { error: (e as Error).message, stdout, stderr };
    } finally {
      process.stdout.write = out;
      process.stderr.write = err;
    }
  }

  it('prints the specializations table and the timing', async () => {
    const dir = tempDir('cli-compile');
    const r = await compileCli(join(repoRoot, 'specs/stories260k.qal'), '-o', join(dir, 'out'));
    expect(r.error).toBeUndefined();
    expect(r.stdout).toMatch(/^kernel\s+bits\s+group/);
    expect(r.stdout).toMatch(/b4_g43_fp32_mean\s+4\s+43\s+fp32\s+mean\s+no\s.*\sdown$/m);
    expect(r.stdout).toMatch(/7 layers → 2 specializations; \d+ files in .*out/);
    expect(r.stdout).toMatch(/compiled in \d+ ms \(plan [\d.]+, render [\d.]+, bindings \d+, write [\d.]+\)/);
    expect(JSON.parse(readFileSync(join(dir, 'out', 'manifest.json'), 'utf8')).layers.down.specialization).toBe('b4_g43_fp32_mean');
  });

  it('prints located diagnostics and fails on a spec with errors, writing nothing', async () => {
    const dir = tempDir('cli-bad');
    writeFileSync(join(dir, 'bad.qal'), 'spec bad {\n  qalora { bits 5 group 32 rank 1 alpha 1 }\n  layer a { in 64 out 8 }\n  target cpu\n}\n');
    const r = await compileCli(join(dir, 'bad.qal'), '-o', join(dir, 'out'));
    expect(r.error).toMatch(/bad\.qal: \d+ errors? in the spec; nothing was compiled/);
    expect(r.stderr).toMatch(/bad\.qal:2:\d+: error: .*bits/);
    expect(existsSync(join(dir, 'out'))).toBe(false);
  });
});
