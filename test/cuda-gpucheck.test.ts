// bench/gpu-check.sh must work the day a GPU is lent, so CI runs its --dry mode: the addon builds, the emulator
// half of the kernel grid agrees with the float64 reference, the benchmark compiles against the rendered
// llama2-7b kernels and, finding no GPU, says so and skips. The output format checked here is bench/README.md's.
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from './fixtures.ts';

describe('bench/gpu-check.sh --dry', () => {
  it('runs the emulator grid and the benchmark build, and skips the GPU parts with a message', () => {
    const out = mkdtempSync(join(tmpdir(), 'qalora-gpucheck-'));
    try {
      const r = spawnSync('bash', [join(repoRoot, 'bench', 'gpu-check.sh'), '--dry'], {
        cwd: repoRoot,
        env: { ...process.env, OUT: out },
        encoding: 'utf8',
        timeout: 1_500_000,
      });
      const log = r.stdout + r.stderr;
      expect(r.status, log.slice(-3000)).toBe(0);

      const summary = readFileSync(join(out, 'summary.txt'), 'utf8');
      expect(readFileSync(join(out, 'gpu-check.log'), 'utf8')).toContain('GPU-CHECK done status=pass dry=1 gpu=0');
      expect(summary).toMatch(/^SKIP cuda backend grid \(no GPU\)/m);
      expect(summary).toMatch(/^GRID-SUMMARY against=reference backend=emu cases=20 checks=180 failures=0 /m);
      expect(summary).toMatch(/^bench built spec=b4_g32_fp16_mean arch=sm_80/m);
      expect(summary).toMatch(/^SKIP gpu benchmark \(no GPU\): the binary ran and reported STATUS unavailable: /m);
      expect(existsSync(join(out, 'bench.json'))).toBe(false);

      // grid.json: every op of every case, each within its tolerance, quantization exact.
      const grid = JSON.parse(readFileSync(join(out, 'grid.json'), 'utf8')) as {
        rows: Array<{ id: string; m: number; op: string; err: number; tol: number; ok: boolean }>;
      };
      const ids = new Set(grid.rows.map((row) => row.id));
      expect([...ids].sort()).toEqual(['b2_g64_bf16_peft', 'b3_g43_fp32_sum', 'b4_g32_fp16_mean', 'b4_g32_fp32_mean_s16']);
      for (const row of grid.rows) {
        expect(row.ok, JSON.stringify(row)).toBe(true);
        expect(row.err).toBeLessThanOrEqual(row.tol);
      }
      const ops = new Set(grid.rows.map((row) => row.op));
      expect([...ops].sort()).toEqual(['alpha', 'beta', 'dequantize', 'dx', 'forward', 'gradA', 'gradB', 'merge', 'qweight']);
      expect(new Set(grid.rows.map((row) => row.m))).toEqual(new Set([1, 3, 12, 64, 520]));
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('rejects an unknown option', () => {
    const r = spawnSync('bash', [join(repoRoot, 'bench', 'gpu-check.sh'), '--fast'], { cwd: repoRoot, encoding: 'utf8' });
    expect(r.status).toBe(64);
    expect(r.stderr).toContain('unknown option --fast');
  });
});
