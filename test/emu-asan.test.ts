// The generated CUDA kernels (a subset of the grid's specializations) under the emulator built with
// AddressSanitizer, outside the addon: every entry point with ragged sizes, so an out-of-bounds index into any
// global buffer (cudaMalloc) or a block's dynamic shared memory is reported with its source line.
import { beforeAll, describe, expect, it } from 'vitest';
import { driverSpec, writeGridDriver, type DriverCase } from './emu/grid-driver.ts';
import { buildFile, runProgram } from './emu/harness.ts';

describe('generated kernels under AddressSanitizer', () => {
  const picks: DriverCase[] = [
    { id: 'b4_g32_fp32_mean', bits: 4, group: 32, dtype: 'fp32', pool: 'mean', in: 96, out: 37 },
    { id: 'b3_g43_fp16_sum', bits: 3, group: 43, dtype: 'fp16', pool: 'sum', in: 172, out: 50 },
    { id: 'b2_g64_bf16_peft', bits: 2, group: 64, dtype: 'bf16', pool: 'peft', in: 192, out: 33 },
    { id: 'b8_g128_fp16_mean', bits: 8, group: 128, dtype: 'fp16', pool: 'mean', in: 256, out: 29 },
  ];
  let exe: string;
  beforeAll(async () => {
    const spec = driverSpec('emu-asan', picks);
    const { source, includeDirs } = writeGridDriver(spec, picks);
    exe = await buildFile(source, includeDirs, 'asan');
  }, 600_000);

  for (const p of picks)
    for (const [m, rank] of [[1, 8], [5, 0], [67, 16]])
      it(`${p.id} m=${m} rank=${rank}: quantize, dequantize, forward, backward, merge`, async () => {
        const r = await runProgram(exe, [p.id, String(m), String(rank)], { QALORA_EMU_SEED: String(m) });
        expect(r.stderr).not.toContain('AddressSanitizer');
        expect(r.stdout, r.stderr).toContain('ok');
      });
});

describe('deliberately broken variants of the generated GEMM are caught', () => {
  // The pipelined GEMM (tensor-core path for fp16, SIMT for fp32) with its cp.async wait, or the barrier after
  // it, removed: the emulator must produce different (or non-finite) outputs than the real kernels.
  const picks: DriverCase[] = [
    { id: 'b4_g32_fp32_mean', bits: 4, group: 32, dtype: 'fp32', pool: 'mean', in: 96, out: 37 },
    { id: 'b3_g43_fp16_sum', bits: 3, group: 43, dtype: 'fp16', pool: 'sum', in: 172, out: 50 },
  ];
  const pipelineWait = /cp_async_wait<T::STAGES - 2>\(\);/;
  /** Blanks every line of gemm.cuh that `drop` selects (given the line before); fails if none is. */
  const dropInGemm = (drop: (line: string, previous: string) => boolean) => (path: string, content: string) => {
    if (!path.endsWith('/gemm.cuh')) return content;
    const lines = content.split('\n');
    const kept = lines.map((l, i) => (drop(l, lines[i - 1] ?? '') ? '' : l));
    if (kept.every((l, i) => l === lines[i])) throw new Error('gemm.cuh has no pipeline wait to remove: update this variant');
    return kept.join('\n');
  };
  const exes: Record<string, string> = {};
  beforeAll(async () => {
    const spec = driverSpec('emu-variants', picks);
    const build = async (name: string, edit?: Parameters<typeof writeGridDriver>[2]) => {
      const { source, includeDirs } = writeGridDriver(spec, picks, edit);
      exes[name] = await buildFile(source, includeDirs, 'plain');
    };
    await Promise.all([
      build('real'),
      build('no-wait', dropInGemm((l) => pipelineWait.test(l))),
      build('no-barrier', dropInGemm((l, prev) => l.includes('__syncthreads()') && pipelineWait.test(prev))),
    ]);
  }, 600_000);

  for (const variant of ['no-wait', 'no-barrier'])
    for (const p of picks)
      it(`${variant}: ${p.id} forward/backward on the GEMM path differ from the real kernels`, async () => {
        const args = [p.id, '67', '8'];
        const real = await runProgram(exes.real, args);
        expect(real.stdout, real.stderr).toMatch(/^ok checksum /);
        const broken = await runProgram(exes[variant], args);
        expect(broken.stdout).not.toBe(real.stdout);
      });
});
