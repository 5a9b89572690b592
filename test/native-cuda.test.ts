// The real kernels built with every backend into one addon, on a machine without a GPU: nvcc's build (when nvcc
// exists) and the emulator's build of the same .cu link side by side without one taking the other's inline
// helpers, the addon loads, the cuda backend reports itself unavailable and a call to it throws a JS error
// (a C++ exception escaping a wrapper would terminate the process), and the emulated kernels still agree with
// the CPU kernels.
import { spawnSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { loadKernels, type NativeKernels } from '../runtime/native.ts';
import { randomF32, randoms } from './kernel-grid.ts';

const nvcc = spawnSync('nvcc', ['--version']).status === 0;
const spec: ResolvedSpec = {
  name: 'native_all_backends',
  file: '<native-cuda.test>',
  layers: [{ name: 'proj', inFeatures: 96, outFeatures: 24, bits: 4, group: 32, rank: 3, alpha: 6, dropout: 0, pool: 'mean', dtype: 'fp32', scales: 'fp32', count: 1 }],
  targets: { cpu: true, cuda: { archs: ['sm_80'] } },
};

describe('an addon with the cpu, emu and cuda backends of the real kernels', () => {
  let k: NativeKernels;
  beforeAll(async () => {
    k = await loadKernels(spec, { jobs: 2 });
  }, 900_000);

  it('lists its backends and says CUDA is unavailable here', () => {
    expect(k.backends()).toEqual(nvcc ? ['cpu', 'cuda', 'emu'] : ['cpu', 'emu']);
    expect(k.cudaStatus()).toMatch(/^unavailable: /);
  });

  const rnd = randoms(11);
  const [m, inF, out, rank] = [5, 96, 24, 3];
  const w = randomF32(out * inF, rnd);
  const quantized = () => {
    const q = { qweight: new Uint32Array(out * 3 * 4), alpha: new Float32Array(out * 3), beta: new Float32Array(out * 3) };
    k.layer('proj', 'cpu').quantize(w, out, inF, q.qweight, q.alpha, q.beta);
    return q;
  };
  const args = () => ({
    ...quantized(), loraA: randomF32(rank * 3, rnd), loraB: randomF32(out * rank, rnd),
    m, in: inF, out, rank, scale: 2, poolScale: 1 / 32, dropout: 0, training: false, seed: 0,
  });

  it.runIf(nvcc)('a cuda call without a driver throws an Error naming the CUDA failure', () => {
    const a = args();
    expect(() => k.layer('proj', 'cuda').forward(a, randomF32(m * inF, rnd), new Float32Array(m * out))).toThrow(/CUDA/);
  });

  it('the emulated CUDA kernels run (not the real CUDA runtime) and agree with the CPU kernels', () => {
    const a = args();
    const x = randomF32(m * inF, rnd);
    const [yCpu, yEmu] = [new Float32Array(m * out), new Float32Array(m * out)];
    k.layer('proj', 'cpu').forward(a, x, yCpu);
    k.layer('proj', 'emu').forward(a, x, yEmu);
    for (let i = 0; i < yCpu.length; i++) expect(Math.abs(yEmu[i] - yCpu[i])).toBeLessThan(1e-4 * (1 + Math.abs(yCpu[i])));
  });

  it('the emulator counts the exact traffic of a forward call', () => {
    const a = args();
    const x = randomF32(m * inF, rnd);
    const y = new Float32Array(m * out);
    k.emuResetCounters!();
    k.layer('proj', 'emu').forward(a, x, y);
    // templates/cuda/host.cuh stages every call: q, α, β, A, B and x up (one blocking cudaMemcpy each), y down,
    // device buffers for those plus pooled x [m, in/g] and h [m, rank]; one cudaDeviceSynchronize; the pooling
    // kernel and one GEMV launch (m = 5 fits one register block of rows).
    const up = [a.qweight, a.alpha, a.beta, a.loraA, a.loraB, x].reduce((n, t) => n + t.byteLength, 0);
    const scratch = 4 * (m * (inF / 32) + m * rank);
    expect(up).toBe(3972);
    expect(k.emuCounters!()).toEqual({
      h2dCalls: 6, h2dBytes: up, d2hCalls: 1, d2hBytes: y.byteLength, d2dCalls: 0, d2dBytes: 0,
      allocs: 9, allocBytes: up + y.byteLength + scratch, frees: 9, syncs: 6 + 1 + 1, launches: 2,
    });
    k.emuResetCounters!();
    expect(k.emuCounters!().h2dBytes).toBe(0);
  });
});
