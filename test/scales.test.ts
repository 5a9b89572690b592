// `scales fp16` without native code: the reference quantization rule (stored α̂, β̂; q against them; the error
// bound qalora_common.h states), the conversions of runtime/model/scales.ts, GGUF blocks kept as fp16 bits,
// base files storing F16 α/β, the merge's one rounding, and the GGUF export of fp16 scales (exact).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { PROJECTIONS } from '../dsl/resolved.ts';
import { encodeBlocks } from '../runtime/export/gguf.ts';
import { blocksToQuantLinear } from '../runtime/formats/ggml-blocks.ts';
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import { mergeAdapters } from '../runtime/merge.ts';
import { loadQuantizedBase, saveQuantizedBase } from '../runtime/model/basefile.ts';
import { denseWeight } from '../runtime/model/dense.ts';
import { scaleValues, storeScales, withScales } from '../runtime/model/scales.ts';
import type { LlamaWeights, ProjectionName, QuantLinear } from '../runtime/model/types.ts';
import { openSafetensors } from '../runtime/safetensors.ts';
import * as ref from '../runtime/reference/qalora.ts';
import { f16ToF32 } from '../runtime/reference/numeric.ts';
import { quantizeGgml } from '../runtime/formats/ggml-quantize.ts';
import { randomF32, randoms } from './kernel-grid.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-scales-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const settings = (scales: 'fp32' | 'fp16', bits: 2 | 3 | 4 | 8 = 4) =>
  ({ bits, group: 32, rank: 2, alpha: 4, dropout: 0, pool: 'mean', dtype: 'fp32', scales }) as const;

function quantLinear(out: number, inF: number, seed: number, scales: 'fp32' | 'fp16', bits: 2 | 3 | 4 | 8 = 4): QuantLinear {
  const w = randomF32(out * inF, randoms(seed), 0.5);
  return { kind: 'quant', out, in: inF, settings: settings(scales, bits), ...ref.quantize(w, out, inF, bits, 32, scales) };
}

describe('the fp16 quantization rule (reference)', () => {
  for (const bits of [2, 3, 4, 8] as const) {
    it(`${bits} bits: α̂, β̂ are the fp16 roundings; q against them; error ≤ α̂/2 + 2^-11·(|β| + qmax·α)`, () => {
      const out = 6, inF = 96, qmax = 2 ** bits - 1;
      const w = randomF32(out * inF, randoms(bits), 3);
      w.fill(1000.25, 0, 32).fill(1000.75, 0, 1); // |β| ≫ α: where rounding β matters most
      const r32 = ref.quantize(w, out, inF, bits, 32, 'fp32');
      const r16 = ref.quantize(w, out, inF, bits, 32, 'fp16');
      expect(r16.alpha).toBeInstanceOf(Uint16Array);
      expect(Array.from(r16.alpha)).toEqual(Array.from(storeScales(r32.alpha, 'fp16')));
      expect(Array.from(r16.beta)).toEqual(Array.from(storeScales(r32.beta, 'fp16')));
      const a = scaleValues(r16.alpha), b = scaleValues(r16.beta), a32 = r32.alpha as Float32Array, b32 = r32.beta as Float32Array;
      const wHat = ref.dequantize(r16.qweight, a, b, out, inF, bits, 32);
      for (let i = 0; i < w.length; i++) {
        const k = Math.floor(i / 32);
        const bound = a[k] / 2 + Math.abs(b[k] - b32[k]) + qmax * Math.abs(a[k] - a32[k]);
        expect(Math.abs(wHat[i] - w[i])).toBeLessThanOrEqual(bound * (1 + 1e-5) + 1e-7);
        expect(bound).toBeLessThanOrEqual(a[k] / 2 + 2 ** -11 * (Math.abs(b32[k]) + qmax * a32[k]) * (1 + 1e-6));
      }
    });
  }
  it('an α below fp16 range is stored as 2^-24, never 0', () => {
    const w = new Float32Array(32).fill(1e-9);
    w[3] = 1.5e-9;
    const r = ref.quantize(w, 1, 32, 4, 32, 'fp16');
    expect(f16ToF32(r.alpha[0])).toBe(2 ** -24);
  });
});

describe('runtime/model/scales.ts', () => {
  it('widens exactly, narrows only what fits fp16, and refuses the rest', () => {
    const l16 = quantLinear(4, 64, 1, 'fp16');
    const wide = withScales(l16, 'fp32', 'l16');
    expect(wide.alpha).toBeInstanceOf(Float32Array);
    expect(denseWeight(wide)).toEqual(denseWeight(l16));
    const back = withScales(wide, 'fp16', 'wide');
    expect(Buffer.from(back.alpha.buffer).equals(Buffer.from(l16.alpha.buffer))).toBe(true);
    expect(() => withScales(quantLinear(4, 64, 2, 'fp32'), 'fp16', 'layers.0.q')).toThrow(/layers\.0\.q: .*do not fit fp16 exactly.*--requantize/);
  });
});

describe('GGUF blocks with fp16 scales', () => {
  for (const type of [GgmlType.Q4_0, GgmlType.Q4_1, GgmlType.Q8_0]) {
    it(`type ${type}: d and m copied as fp16 bits, the same weights as the fp32 conversion`, () => {
      const out = 5, inF = 96;
      const data = quantizeGgml(type, randomF32(out * inF, randoms(type), 1), out, inF);
      const l16 = blocksToQuantLinear(type, data, out, inF, { scales: 'fp16' })!;
      const l32 = blocksToQuantLinear(type, data, out, inF, {})!;
      expect(l16.alpha).toBeInstanceOf(Uint16Array);
      expect(l16.settings.scales).toBe('fp16');
      expect(l16.alpha.byteLength * 2).toBe(l32.alpha.byteLength);
      expect(Array.from(scaleValues(l16.alpha))).toEqual(Array.from(l32.alpha));
      expect(Array.from(scaleValues(l16.beta))).toEqual(Array.from(l32.beta));
      if (type === GgmlType.Q4_1) {
        const { data: again, maxAbsError } = encodeBlocks(l16, 'Q4_1');
        expect(maxAbsError).toBe(0); // fp16 α/β are the file's d and m: no rounding to report
        expect(Buffer.from(again).equals(Buffer.from(data))).toBe(true);
      }
    });
  }
});

describe('base files and merge with fp16 scales', () => {
  const dim = 32, hidden = 64;
  const shape: Record<ProjectionName, [number, number]> = { q: [dim, dim], k: [dim, dim], v: [dim, dim], o: [dim, dim], gate: [hidden, dim], up: [hidden, dim], down: [dim, hidden] };
  const model = (scales: 'fp32' | 'fp16'): LlamaWeights => {
    const proj = Object.fromEntries(PROJECTIONS.map((p, i) => [p, quantLinear(shape[p][0], shape[p][1], 10 + i, scales)])) as Record<ProjectionName, QuantLinear>;
    const emb = randomF32(8 * dim, randoms(3));
    return {
      config: { dim, hidden, layers: 1, heads: 2, kvHeads: 2, vocab: 8, context: 8, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true },
      tokEmbedding: emb, classifier: emb, finalNorm: new Float32Array(dim).fill(1),
      blocks: [{ attnNorm: new Float32Array(dim).fill(1), ffnNorm: new Float32Array(dim).fill(1), proj }],
    };
  };

  it('a base file stores α/β as F16 tensors and reads them back bit for bit', () => {
    const w = model('fp16');
    const file = join(dir, 'base16.safetensors');
    saveQuantizedBase(file, w);
    const f = openSafetensors(file);
    expect(f.tensors.get('layers.0.q.alpha')!.dtype).toBe('F16');
    f.close();
    const back = loadQuantizedBase(file).weights.blocks[0].proj.q as QuantLinear;
    const orig = w.blocks[0].proj.q as QuantLinear;
    expect(back.settings.scales).toBe('fp16');
    expect(back.alpha).toBeInstanceOf(Uint16Array);
    expect(Buffer.from(back.alpha.buffer).equals(Buffer.from(orig.alpha.buffer))).toBe(true);
    expect(Buffer.from(back.beta.buffer).equals(Buffer.from(orig.beta.buffer))).toBe(true);
  });

  it('merge rounds β\' to fp16 once and reports that rounding; q and α shared', () => {
    const w = model('fp16');
    const rnd = randoms(5);
    const adapters = [Object.fromEntries(PROJECTIONS.map((p) => {
      const [out, inF] = shape[p];
      return [p, { rank: 2, alpha: 4, a: randomF32(2 * (inF / 32), rnd), b: randomF32(out * 2, rnd) }];
    }))];
    const { weights, report } = mergeAdapters(w, adapters);
    const q = weights.blocks[0].proj.q as QuantLinear, q0 = w.blocks[0].proj.q as QuantLinear;
    expect(q.beta).toBeInstanceOf(Uint16Array);
    expect(q.alpha).toBe(q0.alpha);
    expect(report.fp16Rounding).toBeGreaterThan(0);
    const exact = ref.merge({ ...q0, alpha: scaleValues(q0.alpha), beta: scaleValues(q0.beta), loraA: adapters[0].q!.a, loraB: adapters[0].q!.b, m: 1, rank: 2, scale: 2, poolScale: 1 / 32, dropout: 0, training: false, seed: 0, bits: 4, group: 32, pool: 'mean' });
    const got = scaleValues(q.beta);
    for (let i = 0; i < got.length; i++) expect(Math.abs(got[i] - exact[i])).toBeLessThanOrEqual(2 ** -11 * Math.abs(exact[i]) + 2 ** -25);
    expect(report.fp16Rounding).toBeLessThan(2 ** -11 * 8); // half an ulp of values below 8
  });
});
