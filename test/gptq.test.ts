import { beforeAll, describe, expect, it } from 'vitest';
import type { Bits } from '../dsl/resolved.ts';
import { QaloraError } from '../runtime/errors.ts';
import { loadCore } from '../runtime/native.ts';
import { type GptqNative, gptqQuantize, gptqQuantizeLinear, HessianAccumulator } from '../runtime/quantize/gptq.ts';
import { dequantize as refDequantize, quantize as rtn } from '../runtime/reference/qalora.ts';
import { unpackQ, wordsPerRow } from '../runtime/reference/numeric.ts';

let native: GptqNative;
beforeAll(async () => {
  native = (await loadCore()).core as unknown as GptqNative;
});

function rng(seed: number) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 32;
  };
}
const gauss = (r: () => number) => Math.sqrt(-2 * Math.log(r() + 1e-12)) * Math.cos(2 * Math.PI * r());

/** Correlated activations: X = Z·M with a random mixing M and uneven scales per input, like real LLM inputs. */
function correlatedX(n: number, inF: number, seed: number): Float32Array {
  const r = rng(seed);
  const k = Math.max(4, inF >> 2);
  const m = Float64Array.from({ length: k * inF }, () => gauss(r));
  const scale = Float64Array.from({ length: inF }, () => 0.2 + 3 * r() ** 3);
  const x = new Float32Array(n * inF);
  for (let i = 0; i < n; i++) {
    const z = Array.from({ length: k }, () => gauss(r));
    for (let j = 0; j < inF; j++) {
      let s = 0;
      for (let t = 0; t < k; t++) s += z[t] * m[t * inF + j];
      x[i * inF + j] = (s / Math.sqrt(k) + 0.3 * gauss(r)) * scale[j];
    }
  }
  return x;
}

/** ‖X·Wᵀ − X·Ŵᵀ‖² in float64. */
function outputError(x: Float32Array, n: number, inF: number, w: ArrayLike<number>, wq: ArrayLike<number>, out: number): number {
  let e = 0;
  for (let i = 0; i < n; i++) {
    for (let o = 0; o < out; o++) {
      let s = 0;
      for (let j = 0; j < inF; j++) s += x[i * inF + j] * (w[o * inF + j] - wq[o * inF + j]);
      e += s * s;
    }
  }
  return e;
}

/** GPTQ in its original OBS form, float64, no lazy batches: the algorithm as the paper states it. */
function gptqReference(w: Float32Array, out: number, inF: number, h: Float32Array, bits: number, group: number, damp: number): Float64Array {
  const qmax = 2 ** bits - 1;
  const hinv = invert(h, inF, damp);
  const W = Float64Array.from(w);
  const f = Math.fround;
  const params: [number, number][] = new Array(out);
  for (let i = 0; i < inF; i++) {
    const d = hinv[i * inF + i];
    for (let o = 0; o < out; o++) {
      const row = o * inF;
      if (i % group === 0) {
        let mn = Infinity, mx = -Infinity;
        for (let j = i; j < i + group; j++) { mn = Math.min(mn, f(W[row + j])); mx = Math.max(mx, f(W[row + j])); }
        params[o] = [mx === mn ? 1 : f(f(mx - mn) / qmax), mn];
      }
      const [a, b] = params[o];
      const q = Math.min(qmax, Math.max(0, Math.round(f(f(f(W[row + i]) - b) / a))));
      const err = (W[row + i] - (a * q + b)) / d;
      W[row + i] = a * q + b;
      for (let j = i + 1; j < inF; j++) W[row + j] -= err * hinv[i * inF + j];
    }
    // remove input i from H⁻¹ (Gaussian elimination of row/column i)
    for (let p = i + 1; p < inF; p++) {
      const c = hinv[p * inF + i] / d;
      for (let q = i + 1; q < inF; q++) hinv[p * inF + q] -= c * hinv[i * inF + q];
    }
  }
  return W;
}

/** (H + damp·mean(diag)·I)⁻¹ by Gauss-Jordan in float64. */
function invert(h: Float32Array, n: number, damp: number): Float64Array {
  let mean = 0;
  for (let i = 0; i < n; i++) mean += h[i * n + i] / n;
  const a = Float64Array.from(h);
  for (let i = 0; i < n; i++) a[i * n + i] += damp * mean;
  const inv = new Float64Array(n * n);
  for (let i = 0; i < n; i++) inv[i * n + i] = 1;
  for (let c = 0; c < n; c++) {
    const p = a[c * n + c];
    for (let j = 0; j < n; j++) { a[c * n + j] /= p; inv[c * n + j] /= p; }
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = a[r * n + c];
      if (f === 0) continue;
      for (let j = 0; j < n; j++) { a[r * n + j] -= f * a[c * n + j]; inv[r * n + j] -= f * inv[c * n + j]; }
    }
  }
  return inv;
}

describe('GPTQ', () => {
  const n = 384, inF = 128, out = 48;
  const x = correlatedX(n, inF, 1);
  const w = Float32Array.from({ length: out * inF }, (() => { const r = rng(2); return () => gauss(r) * 0.05; })());

  it('accumulates H = 2·XᵀX/n over batches', () => {
    const acc = new HessianAccumulator(native, inF);
    acc.add(x.subarray(0, 100 * inF));
    acc.add(x.subarray(100 * inF));
    expect(acc.rows).toBe(n);
    let worst = 0;
    for (const [a, b] of [[0, 0], [3, 77], [127, 5], [64, 64], [100, 101]]) {
      let s = 0;
      for (let i = 0; i < n; i++) s += x[i * inF + a] * x[i * inF + b];
      const ref = (2 * s) / n;
      worst = Math.max(worst, Math.abs(acc.h[a * inF + b] - ref) / Math.abs(ref));
    }
    expect(worst).toBeLessThan(1e-4);
  });

  it('beats round-to-nearest on the layer output with correlated inputs, at 2, 3 and 4 bits', () => {
    const acc = new HessianAccumulator(native, inF);
    acc.add(x);
    for (const bits of [2, 3, 4] as Bits[]) {
      const g = gptqQuantize(native, w, out, inF, acc.h, { bits, group: 32 });
      const r = rtn(w, out, inF, bits, 32);
      const rtnW = refDequantize(r.qweight, r.alpha, r.beta, out, inF, bits, 32);
      const eG = outputError(x, n, inF, w, g.dequantized, out);
      const eR = outputError(x, n, inF, w, rtnW, out);
      expect(eG, `${bits}-bit: GPTQ ${eG} vs RTN ${eR}`).toBeLessThan(0.8 * eR);
      // the returned Ŵ is exactly what (q, α, β) encode
      const fromQ = refDequantize(g.qweight, g.alpha, g.beta, out, inF, bits, 32);
      let worst = 0;
      for (let i = 0; i < fromQ.length; i++) worst = Math.max(worst, Math.abs(fromQ[i] - g.dequantized[i]));
      expect(worst).toBeLessThan(1e-6);
      expect(Number.isFinite(g.loss) && g.loss > 0).toBe(true);
    }
  });

  it('agrees with a float64 transcription of the paper\'s algorithm (no lazy batches, explicit H⁻¹ updates)', () => {
    const acc = new HessianAccumulator(native, inF);
    acc.add(x);
    const bits = 4, group = 32;
    const g = gptqQuantize(native, w, out, inF, acc.h, { bits, group, block: 64 });
    const ref = gptqReference(w, out, inF, acc.h, bits, group, 0.01);
    const eG = outputError(x, n, inF, w, g.dequantized, out);
    const eRef = outputError(x, n, inF, w, ref, out);
    expect(Math.abs(eG - eRef) / eRef).toBeLessThan(0.02);
    let same = 0;
    for (let i = 0; i < ref.length; i++) if (Math.abs(ref[i] - g.dequantized[i]) < 1e-5) same++;
    expect(same / ref.length).toBeGreaterThan(0.97); // float32 vs float64 may flip a few rounding ties
  });

  it('recovers a weight that is already on the grid exactly', () => {
    const acc = new HessianAccumulator(native, inF);
    acc.add(x);
    for (const bits of [2, 3, 4, 8] as Bits[]) {
      const qmax = 2 ** bits - 1, group = 32, L = inF / group;
      const r = rng(bits);
      const q = Array.from({ length: out * inF }, (_, i) => (i % group === 0 ? 0 : i % group === 1 ? qmax : Math.floor(r() * (qmax + 1))));
      const alpha = Float32Array.from({ length: out * L }, () => 0.001 + r() * 0.02);
      const beta = Float32Array.from({ length: out * L }, () => -r() * 0.1);
      const onGrid = Float32Array.from(q, (v, i) => {
        const k = Math.floor(i / inF) * L + Math.floor((i % inF) / group);
        return Math.fround(Math.fround(alpha[k] * v) + beta[k]);
      });
      const gq = gptqQuantize(native, onGrid, out, inF, acc.h, { bits, group });
      const wpr = wordsPerRow(inF, bits);
      let mismatches = 0;
      for (let o = 0; o < out; o++) for (let i = 0; i < inF; i++) if (unpackQ(gq.qweight, o * wpr, i, bits) !== q[o * inF + i]) mismatches++;
      expect(mismatches, `${bits}-bit`).toBe(0);
      let worst = 0;
      for (let i = 0; i < onGrid.length; i++) worst = Math.max(worst, Math.abs(gq.dequantized[i] - onGrid[i]));
      expect(worst).toBeLessThan(1e-6);
    }
  });

  it('handles dead inputs (a column never active) and reports bad arguments', () => {
    const xd = x.slice();
    for (let i = 0; i < n; i++) xd[i * inF + 5] = 0;
    const acc = new HessianAccumulator(native, inF);
    acc.add(xd);
    const lin = gptqQuantizeLinear(native, { kind: 'float', out, in: inF, w }, acc.h, { bits: 4, group: 32, rank: 8, alpha: 16, dropout: 0, pool: 'mean', dtype: 'fp32', scales: 'fp32' });
    expect(lin.alpha.every(Number.isFinite) && lin.beta.every(Number.isFinite)).toBe(true);
    expect(lin.qweight.length).toBe(out * 4 * 4);
    expect(() => gptqQuantize(native, w, out, inF, acc.h, { bits: 4, group: 48 })).toThrow(/group 48 must divide in_features 128/);
    expect(() => acc.add(new Float32Array(100))).toThrow(QaloraError);
    expect(() => gptqQuantize(native, w, out, inF, new Float32Array(inF * inF).fill(NaN), { bits: 4, group: 32 })).toThrow(/GPTQ: .*not positive definite/);
  });
});
