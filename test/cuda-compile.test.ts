// Static checks of the emitted CUDA, every CI run: nvcc builds every specialization of the kernel grid and of
// the example specs for sm_80 and sm_90 with spills as errors, every kernel exists for each arch, and ptxas's
// registers × threads stay within the plan's budget (maxRegisters at the block size each kernel launches with).
import { describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadSpec } from '../dsl/index.ts';
import type { ResolvedLayer, ResolvedSpec } from '../dsl/resolved.ts';
import { planSpec } from '../compiler/plan.ts';
import type { KernelPlan } from '../compiler/ir.ts';
import { demangle, gemmSmemBytes, nvccAvailable, nvccCompile, parsePtxas, renderCuda, shortKernelName } from '../compiler/inspect.ts';
import { kernelGrid } from './kernel-grid.ts';
import { repoRoot } from './fixtures.ts';

const ARCHS = ['sm_80', 'sm_90'];
// Shared memory a block may use (opt-in maximum) per arch.
const SMEM_LIMIT: Record<string, number> = { sm_80: 163 * 1024, sm_90: 227 * 1024 };
const EXPECTED_KERNELS = [
  'quantize_stats_kernel', 'pack_kernel', 'dequantize_kernel', 'pool_kernel', 'gemv_kernel<M≤1>', 'gemv_kernel<M≤8>',
  'gemm_kernel<y>', 'gemm_kernel<dx>', 'lora_dh_kernel', 'lora_grad_a_kernel', 'lora_grad_b_kernel', 'lora_reduce_kernel', 'lora_dpx_kernel', 'merge_kernel',
];

/** The example specs (specs/*.qal) that must be there, plus any other example. */
function exampleSpecs(): ResolvedSpec[] {
  const files = readdirSync(join(repoRoot, 'specs')).filter((f) => f.endsWith('.qal'));
  for (const need of ['stories260k.qal', 'llama2-7b.qal']) expect(files, `specs/${need} missing`).toContain(need);
  return files.map((f) => {
    const r = loadSpec(join(repoRoot, 'specs', f));
    expect(r.spec, `specs/${f} does not resolve: ${r.diagnostics.map((d) => d.message).join('; ')}`).toBeDefined();
    return r.spec!;
  });
}

/** One standalone layer per distinct (bits, group, dtype, pool) across the grid and the examples, split in two. */
function combinedSpecs(): ResolvedSpec[] {
  const sources = [kernelGrid({ targets: { cpu: false, cuda: { archs: ARCHS } } }).spec, ...exampleSpecs()];
  const byKey = new Map<string, ResolvedLayer>();
  for (const spec of sources) {
    expect(spec.targets.cuda?.archs ?? ARCHS, `${spec.name} archs`).toEqual(expect.arrayContaining(['sm_80', 'sm_90']));
    for (const l of spec.layers) {
      const key = `b${l.bits}_g${l.group}_${l.dtype}_${l.pool}`;
      if (!byKey.has(key)) byKey.set(key, { ...l, name: `l_${key}` });
    }
  }
  const layers = [...byKey.values()];
  const half = Math.ceil(layers.length / 2);
  return [layers.slice(0, half), layers.slice(half)].map((part, i) => ({
    name: `cuda_compile_${i}`,
    file: `<cuda-compile-${i}>`,
    layers: part,
    targets: { cpu: false, cuda: { archs: ARCHS } },
  }));
}

describe('CUDA kernels compile for sm_80 and sm_90 without spills', () => {
  it('nvcc is installed', () => {
    expect(nvccAvailable()).toBe(true);
  });

  it('every specialization of the grid and of specs/*.qal', async () => {
    const work = mkdtempSync(join(tmpdir(), 'qalora-cuda-compile-'));
    try {
      const plans: KernelPlan[] = combinedSpecs().map(planSpec);
      const sources = plans.map((p, i) => renderCuda(p, join(work, String(i))));
      // Two nvcc processes (2 cores); each covers both archs from one front-end pass.
      const results = await Promise.all(sources.map((cu) => nvccCompile(cu, ARCHS)));
      results.forEach((r, i) => expect(r.ok, `nvcc failed for ${sources[i]}:\n${r.log.slice(-4000)}`).toBe(true));

      let checked = 0;
      plans.forEach((plan, i) => {
        const kernels = parsePtxas(results[i].log);
        const names = demangle(kernels.map((k) => k.mangled));
        for (const s of plan.specializations) {
          const cuda = s.cuda!;
          for (const arch of ARCHS) {
            const mine = kernels.filter((k) => k.arch === arch && k.mangled.includes(`${s.id.length}${s.id}`));
            const found = mine.map((k) => shortKernelName(names.get(k.mangled)!));
            expect(found.sort(), `${s.id} ${arch}`).toEqual([...EXPECTED_KERNELS].sort());
            for (const k of mine) {
              const name = `${s.id} ${shortKernelName(names.get(k.mangled)!)} ${arch}`;
              expect(k.spillStores + k.spillLoads, `${name} spills`).toBe(0);
              expect(k.stackFrame, `${name} local memory`).toBe(0);
              const isGemm = k.mangled.includes('gemm_kernel');
              const isGemv = k.mangled.includes('gemv_kernel');
              const threads = isGemm ? cuda.gemm.warps * 32 : isGemv ? cuda.gemv.threads : 256;
              if (isGemm || isGemv) {
                // The plan's occupancy target: 65536 / (threads · maxRegisters) blocks per SM must fit.
                expect(k.registers, `${name} registers vs plan`).toBeLessThanOrEqual(cuda.maxRegisters);
                const blocks = Math.max(1, Math.floor(65536 / (threads * cuda.maxRegisters)));
                expect(k.registers * threads * blocks, `${name} register file`).toBeLessThanOrEqual(65536);
              } else {
                expect(k.registers * threads, `${name} register file`).toBeLessThanOrEqual(65536);
              }
              if (isGemm) {
                const dyn = gemmSmemBytes(s, k.mangled.includes('Lb1E'));
                expect(dyn + k.staticSmem, `${name} shared memory`).toBeLessThanOrEqual(SMEM_LIMIT[arch]);
              }
              checked++;
            }
          }
        }
      });
      expect(checked).toBeGreaterThan(0);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });
});
