// The CUDA emulator (templates/emu) on its own test kernels (test/emu/kernels.cu): each case checks the GPU
// semantics against a host reference, under several scheduling seeds and under AddressSanitizer; then
// deliberately broken variants of the same kernels must be caught, one per class of bug.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { repoRoot } from './fixtures.ts';
import { buildProgram, compileOnly, runProgram, tagLine, variant, type RunResult } from './emu/harness.ts';

const source = readFileSync(join(repoRoot, 'test', 'emu', 'kernels.cu'), 'utf8');
const cases = [
  'vadd',
  'vadd_dims',
  'reduce',
  'votes',
  'atomics',
  'matmul_static',
  'matmul_dynamic',
  'mma_f16',
  'mma_bf16',
  'ldmatrix',
  'cp_async',
  'bits',
  'launch_errors',
  'rotate',
  'vectors',
  'counters',
  'api_misuse',
];

const aborted = (r: RunResult) => r.signal === 'SIGABRT' || (r.code !== null && r.code !== 0 && r.code !== 1);
const failedCheck = (r: RunResult, name: string) => r.code === 1 && r.stdout.includes(`FAIL ${name}`);

let plain: string;
let asan: string;
const broken: Record<string, Promise<string>> = {};

beforeAll(async () => {
  const v = (tag: string, replacement = '', flavour: 'plain' | 'asan' = 'plain') =>
    buildProgram('kernels.cu', variant(source, tag, replacement), flavour);
  broken.syncAfterLoad = v('sync-after-load');
  broken.syncBeforeOverwrite = v('sync-before-overwrite');
  broken.cpWait = v('cp-wait');
  broken.partialBarrier = v('partial-barrier', '  if (threadIdx.x < 40) __syncthreads();  // @partial-barrier');
  broken.vec16 = v('vec16-offset', '  const int off16 = 2;  // 8-byte aligned: not enough for a 16-byte load');
  broken.vec8 = v('vec8-offset', '  const int off8 = 1;');
  broken.globalOob = v('vadd-bound', '  if (i <= n) c[i] = a[i] + b[i];', 'asan');
  broken.sharedOob = v(
    'smem-index',
    '    Bt[tx * T + ty + 1] = col < N && k0 + ty < K ? B[(k0 + ty) * N + col] : 0.f;',
    'asan',
  );
  [plain, asan] = await Promise.all([buildProgram('kernels.cu', source), buildProgram('kernels.cu', source, 'asan')]);
  await Promise.all(Object.values(broken));
}, 300_000);

describe('emulated kernels agree with host references', () => {
  for (const name of cases) {
    it(name, async () => {
      for (const seed of ['0', '1', '977']) {
        const r = await runProgram(plain, [name], { QALORA_EMU_SEED: seed });
        expect(r.stdout, `seed ${seed}: ${r.stderr}`).toContain(`ok ${name}`);
        expect(r.code).toBe(0);
      }
    });
  }

  it('runs every case clean under AddressSanitizer', async () => {
    for (const name of cases) {
      const r = await runProgram(asan, [name], { QALORA_EMU_SEED: '5' });
      expect(r.stderr).not.toContain('AddressSanitizer');
      expect(r.stdout, r.stderr).toContain(`ok ${name}`);
    }
  });

  it('gives the same results on one worker thread as on several', async () => {
    const r = await runProgram(plain, ['atomics'], { QALORA_EMU_THREADS: '1' });
    expect(r.stdout, r.stderr).toContain('ok atomics');
  });
});

describe('deliberately broken kernels are caught', () => {
  it('a missing __syncthreads after a shared-memory load gives wrong data, whatever the seed', async () => {
    const exe = await broken.syncAfterLoad;
    for (const seed of ['0', '1', '2']) {
      const r = await runProgram(exe, ['matmul_static'], { QALORA_EMU_SEED: seed });
      expect(failedCheck(r, 'matmul_static'), `seed ${seed}: ${r.stdout}`).toBe(true);
    }
  });

  it('a missing __syncthreads before a tile is overwritten gives wrong data', async () => {
    const exe = await broken.syncBeforeOverwrite;
    for (const seed of ['0', '3']) {
      const r = await runProgram(exe, ['matmul_static'], { QALORA_EMU_SEED: seed });
      expect(failedCheck(r, 'matmul_static'), `seed ${seed}: ${r.stdout}`).toBe(true);
    }
  });

  it('a missing cp.async wait leaves stale shared memory', async () => {
    const r = await runProgram(await broken.cpWait, ['cp_async']);
    expect(failedCheck(r, 'cp_async'), r.stdout).toBe(true);
  });

  it('a barrier reached by part of the block aborts with every thread state', async () => {
    const r = await runProgram(await broken.partialBarrier, ['rotate']);
    expect(aborted(r)).toBe(true);
    const line = tagLine(source, 'partial-barrier');
    expect(r.stderr).toContain('divergent barrier');
    expect(r.stderr).toContain('kernel rotate_sum launched at');
    expect(r.stderr).toMatch(new RegExp(`threads 0-39 .*waiting at __syncthreads \\(.*kernels\\.cu:${line}\\)`));
    expect(r.stderr).toMatch(new RegExp(`threads 40-63 .*waiting at __syncthreads \\(.*kernels\\.cu:${line + 2}\\)`));
  });

  it('a warp collective that a lane skips aborts as a deadlock with thread states', async () => {
    const r = await runProgram(plain, ['warp_deadlock']);
    expect(aborted(r)).toBe(true);
    expect(r.stderr).toContain('deadlock');
    expect(r.stderr).toMatch(/threads 0-30 .*waiting at __shfl_xor_sync with mask 0xffffffff/);
    expect(r.stderr).toMatch(/thread 31 \(31,0,0\) \[warp 0 lane 31\]: waiting at __syncthreads/);
  });

  it('a misaligned 16-byte vector load aborts at the kernel line, naming the type and the CUDA thread', async () => {
    const r = await runProgram(await broken.vec16, ['vectors']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('ok vectors');
    expect(r.stderr).toMatch(new RegExp(`kernels\\.cu:${tagLine(source, 'vec16')}:\\d+: runtime error: .*misaligned address 0x[0-9a-f]+ for type 'const struct uint4', which requires 16 byte alignment`));
    expect(r.stderr).toMatch(/qalora emu: in kernel copy_vec16 launched at .*, block \(0,0,0\), thread 0 \(0,0,0\)/);
  });

  it('a misaligned 8-byte vector load aborts at the kernel line', async () => {
    const r = await runProgram(await broken.vec8, ['vectors']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(new RegExp(`kernels\\.cu:${tagLine(source, 'vec8')}:\\d+: runtime error: .*misaligned address .* 'const struct float2', which requires 8 byte alignment`));
  });

  it('a read after cudaFree sees the poison pattern (NaN in fp32, fp16 and bf16)', async () => {
    const r = await runProgram(plain, ['use_after_free']);
    expect(r.stdout, r.stderr).toContain('read poison');
    expect(r.code).toBe(0);
  });

  it('a read after cudaFree is reported by AddressSanitizer at the kernel line', async () => {
    const r = await runProgram(asan, ['use_after_free']);
    expect(r.stderr).toContain('use-after-poison');
    expect(r.stderr).toMatch(new RegExp(`in read_back\\(.*kernels\\.cu:${tagLine(source, 'after-free')}`));
  });

  it('an off-by-one global index is reported by AddressSanitizer at the kernel line', async () => {
    const r = await runProgram(await broken.globalOob, ['vadd']);
    expect(r.stderr).toContain('heap-buffer-overflow');
    expect(r.stderr).toMatch(new RegExp(`in vadd\\(.*kernels\\.cu:${tagLine(source, 'vadd-bound')}`));
  });

  it('an off-by-one dynamic shared memory index is reported by AddressSanitizer at the kernel line', async () => {
    const r = await runProgram(await broken.sharedOob, ['matmul_dynamic']);
    expect(r.stderr).toContain('heap-buffer-overflow');
    expect(r.stderr).toMatch(new RegExp(`in matmul_dynamic\\(.*kernels\\.cu:${tagLine(source, 'smem-index')}`));
  });
});

describe('unsupported constructs are refused by name', () => {
  const kernel = (body: string, prelude = '') =>
    `#include "cuda_emu.h"\n${prelude}\n__global__ void k(float* x) {\n${body}\n}\n`;
  const refusals: [string, string, string][] = [
    ['__activemask', 'x[0] = (float)__activemask();', ''],
    ['cooperative groups', 'cooperative_groups::this_thread_block();', '#include <cooperative_groups.h>'],
    ['texture objects', 'x[0] = tex1Dfetch<float>(0ull, 0);', ''],
    ['inline asm', 'asm volatile("bar.sync 0;");', ''],
    ['cudaLaunchKernel', 'cudaLaunchKernel((const void*)&k, dim3(1), dim3(1), nullptr, 0, 0);', ''],
  ];
  for (const [what, body, prelude] of refusals) {
    it(what, async () => {
      const r = await compileOnly(kernel(body, prelude));
      expect(r.ok).toBe(false);
      expect(r.stderr).toMatch(/qalora CUDA emulator|qalora_emulator_refuses_inline_asm/);
      if (what !== 'inline asm') expect(r.stderr).toContain(what === 'texture objects' ? 'tex1Dfetch' : what);
    });
  }

  it('a launch from device code (dynamic parallelism) aborts', async () => {
    const exe = await buildProgram(
      'nested.cu',
      kernel('if (threadIdx.x == 0) QL_LAUNCH(k, 1, 1, 0, 0)(x);') +
        'int main() { float* x; cudaMalloc(&x, 4); QL_LAUNCH(k, 1, 32, 0, 0)(x); return 0; }\n',
    );
    const r = await runProgram(exe, []);
    expect(aborted(r)).toBe(true);
    expect(r.stderr).toContain('dynamic parallelism is not supported');
  });
});
