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

  it('the emulator counts the exact traffic of a staged forward call, and the pool makes no allocation once warm', () => {
    const a = args();
    const x = randomF32(m * inF, rnd);
    const y = new Float32Array(m * out);
    k.layer('proj', 'emu').forward(a, x, y); // warms the pool with this call's sizes
    k.emuResetCounters!();
    k.layer('proj', 'emu').forward(a, x, y);
    // Host arrays are staged by the addon (templates/addon/device_tensor.h): q, α, β, A, B and x go up queued
    // (cudaMemcpyAsync, no wait), y comes down once (the call's one wait). Staging buffers and the kernels'
    // temporaries (pooled x, h) come from the pool, which the first call filled: no cudaMalloc, no cudaFree.
    const up = [a.qweight, a.alpha, a.beta, a.loraA, a.loraB, x].reduce((n, t) => n + t.byteLength, 0);
    expect(up).toBe(3972);
    expect(k.emuCounters!()).toEqual({
      h2dCalls: 6, h2dBytes: up, d2hCalls: 1, d2hBytes: y.byteLength, d2dCalls: 0, d2dBytes: 0,
      allocs: 0, allocBytes: 0, frees: 0, syncs: 1, launches: 2,
    });
    k.emuResetCounters!();
    expect(k.emuCounters!().h2dBytes).toBe(0);
  });

  it('device tensors are used in place: a resident forward moves no bytes and waits for nothing', () => {
    const dev = k.device.emu!;
    const a = args();
    const x = randomF32(m * inF, rnd);
    const staged = new Float32Array(m * out);
    k.layer('proj', 'emu').forward(a, x, staged);
    const put = (t: Float32Array) => {
      const d = dev.alloc('f32', t.length);
      d.upload(t);
      return d;
    };
    const q = dev.alloc('u32', a.qweight.length);
    q.upload(a.qweight);
    const resident = { ...a, qweight: q, alpha: put(a.alpha), beta: put(a.beta), loraA: put(a.loraA), loraB: put(a.loraB) };
    const dx = put(x), dy = dev.alloc('f32', m * out);
    k.emuResetCounters!();
    k.layer('proj', 'emu').forward(resident, dx, dy);
    const c = k.emuCounters!();
    expect([c.h2dBytes, c.d2hBytes, c.syncs, c.allocs, c.launches]).toEqual([0, 0, 0, 0, 2]);
    expect(Array.from(dy.download(new Float32Array(m * out)))).toEqual(Array.from(staged));
    expect(k.emuCounters!().syncs).toBe(1);
    // A view reads the rows it names.
    expect(Array.from(dy.view(out, out).download(new Float32Array(out)))).toEqual(Array.from(staged.subarray(out, 2 * out)));
  });

  it('device tensors are refused, by name, where they do not belong', () => {
    const dev = k.device.emu!;
    const a = args();
    const x = dev.alloc('f32', m * inF), y = new Float32Array(m * out);
    expect(() => k.layer('proj', 'cpu').forward(a, x as never, y)).toThrow(/cpu\.b4_g32_fp32_mean\.forward: argument 'x' is a DeviceTensor\(emu, f32, length 480\), but the cpu kernels take host arrays/);
    expect(() => k.layer('proj', 'emu').forward(a, dev.alloc('f32', 7) as never, y)).toThrow(/argument 'x' must be f32 of length 480 \(m\*in = 5\*96\), got a DeviceTensor\(emu, f32, length 7\)/);
    expect(() => k.layer('proj', 'emu').forward({ ...a, qweight: dev.alloc('f32', a.qweight.length) } as never, x as never, y)).toThrow(/args\.qweight' must be u32/);
    const gone = dev.alloc('f32', m * inF);
    gone.release();
    expect(() => k.layer('proj', 'emu').forward(a, gone as never, y)).toThrow(/released DeviceTensor/);
    expect(() => x.view(400, 100)).toThrow(/\[400, 500\) is outside the tensor's 480 elements/);
    expect(() => x.upload(new Float32Array(481))).toThrow(/do not fit/);
    expect(() => x.upload(new Int32Array(4) as never)).toThrow(/typed array of f32/);
  });

  it('the pool serves repeated sizes from its free lists and gives them back on trim', () => {
    const dev = k.device.emu!;
    dev.trim();
    k.emuResetCounters!();
    for (let i = 0; i < 5; i++) dev.alloc('f32', 1000).release();
    expect(k.emuCounters!().allocs).toBe(1);
    expect(dev.stats().cachedBytes).toBeGreaterThanOrEqual(4000);
    dev.trim();
    expect(k.emuCounters!().frees).toBe(1);
    expect(dev.stats().cachedBytes).toBe(0);
  });
});
