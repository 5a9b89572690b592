// The float64 oracle of the QA-LoRA kernels: obvious loops, no cleverness, so a reader can check it against the
// equations (docs/ARCHITECTURE.md, notes §1) and the native kernels can be checked against it. Quantization
// follows templates/common/qalora_common.h in fp32 steps so it agrees bit for bit; everything else is float64.
import type { Bits, Pool, ScaleDType } from '../../dsl/resolved.ts';
import type { LayerCallArgs } from '../native-api.ts';
import { dropoutKeep, f16ToF32, f32ToF16, packQ, rintEven, unpackQ, wordsPerRow } from './numeric.ts';

/** alpha/beta in the storage asked for: Float32Array (fp32), or Uint16Array of fp16 bits (fp16). */
export interface RefQuantized {
  qweight: Uint32Array;
  alpha: Float32Array | Uint16Array;
  beta: Float32Array | Uint16Array;
}

/**
 * One layer call: the native LayerArgs' sizes and settings (runtime/native-api.ts, emitted from the kernel ABI)
 * with its arrays as plain numbers, and bits/group/pool from the specialization.
 */
export interface RefLayerArgs extends Pick<LayerCallArgs, 'm' | 'in' | 'out' | 'rank' | 'scale' | 'poolScale' | 'dropout' | 'training' | 'seed'> {
  bits: Bits;
  group: number;
  pool: Pool;
  qweight: Uint32Array;
  alpha: ArrayLike<number>;
  beta: ArrayLike<number>;
  loraA?: ArrayLike<number>;
  loraB?: ArrayLike<number>;
}

function checkGroup(inFeatures: number, group: number): number {
  if (!(group > 0) || inFeatures % group !== 0) throw new Error(`group ${group} does not divide in ${inFeatures}`);
  return inFeatures / group;
}

/**
 * Min-max round-to-nearest per (row, group), in fp32 steps exactly as qalora_common.h describes: α and β stored
 * as `scales` (fp16: each rounded to nearest even, an α that underflows to 0 stored as 2^-24), q computed
 * against the stored values.
 */
export function quantize(w: ArrayLike<number>, out: number, inF: number, bits: Bits, group: number, scales: ScaleDType = 'fp32'): RefQuantized {
  const L = checkGroup(inF, group);
  const wpr = wordsPerRow(inF, bits);
  const qmax = 2 ** bits - 1;
  const qweight = new Uint32Array(out * wpr);
  const alpha = scales === 'fp16' ? new Uint16Array(out * L) : new Float32Array(out * L);
  const beta = scales === 'fp16' ? new Uint16Array(out * L) : new Float32Array(out * L);
  const f = Math.fround;
  // store: the value kept; widen: what that value reads back as
  const store = (v: number) => (scales === 'fp16' ? f32ToF16(v) : f(v));
  const widen = (s: number) => (scales === 'fp16' ? f16ToF32(s) : s);
  for (let o = 0; o < out; o++) {
    for (let k = 0; k < L; k++) {
      let mn = Infinity;
      let mx = -Infinity;
      for (let i = k * group; i < (k + 1) * group; i++) {
        const v = f(w[o * inF + i]);
        mn = Math.min(mn, v);
        mx = Math.max(mx, v);
      }
      let as = store(mx === mn ? 1 : f(f(mx - mn) / qmax));
      if (widen(as) === 0) as = store(2 ** -24);
      const bs = store(mn);
      alpha[o * L + k] = as;
      beta[o * L + k] = bs;
      const a = widen(as), b = widen(bs);
      for (let i = k * group; i < (k + 1) * group; i++) {
        const q = rintEven(f(f(f(w[o * inF + i]) - b) / a));
        packQ(qweight, o * wpr, i, bits, Math.min(qmax, Math.max(0, q)));
      }
    }
  }
  return { qweight, alpha, beta };
}

/** Ŵ = α·q + β in float64. */
export function dequantize(
  qweight: Uint32Array, alpha: ArrayLike<number>, beta: ArrayLike<number>,
  out: number, inF: number, bits: Bits, group: number,
): Float64Array {
  const L = checkGroup(inF, group);
  const wpr = wordsPerRow(inF, bits);
  const w = new Float64Array(out * inF);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inF; i++) {
      const k = Math.floor(i / group);
      w[o * inF + i] = alpha[o * L + k] * unpackQ(qweight, o * wpr, i, bits) + beta[o * L + k];
    }
  }
  return w;
}

/** Dropout factor of element `index`: 0 or 1/(1-p); 1 when not training. */
function dropFactor(a: RefLayerArgs, index: number): number {
  if (!a.training || a.dropout <= 0) return 1;
  return dropoutKeep(a.seed, index, a.dropout) ? 1 / (1 - a.dropout) : 0;
}

/** p [m, L] = drop(c·Σ_group x) for mean/sum, c·Σ_group drop(x) for peft (notes §1). */
export function pooled(a: RefLayerArgs, x: ArrayLike<number>): Float64Array {
  const L = checkGroup(a.in, a.group);
  const p = new Float64Array(a.m * L);
  for (let r = 0; r < a.m; r++) {
    for (let k = 0; k < L; k++) {
      let s = 0;
      for (let i = k * a.group; i < (k + 1) * a.group; i++) {
        s += x[r * a.in + i] * (a.pool === 'peft' ? dropFactor(a, r * a.in + i) : 1);
      }
      p[r * L + k] = a.poolScale * s * (a.pool === 'peft' ? 1 : dropFactor(a, r * L + k));
    }
  }
  return p;
}

/** h [m, rank] = p·Aᵀ. */
function lowRank(a: RefLayerArgs, p: Float64Array): Float64Array {
  const L = a.in / a.group;
  const h = new Float64Array(a.m * a.rank);
  for (let r = 0; r < a.m; r++) {
    for (let j = 0; j < a.rank; j++) {
      let s = 0;
      for (let k = 0; k < L; k++) s += p[r * L + k] * a.loraA![j * L + k];
      h[r * a.rank + j] = s;
    }
  }
  return h;
}

/** y [m, out] = x·Ŵᵀ + s·(p·Aᵀ)·Bᵀ. */
export function forward(a: RefLayerArgs, x: ArrayLike<number>): Float64Array {
  const w = dequantize(a.qweight, a.alpha, a.beta, a.out, a.in, a.bits, a.group);
  const y = new Float64Array(a.m * a.out);
  const h = a.rank > 0 ? lowRank(a, pooled(a, x)) : new Float64Array(0);
  for (let r = 0; r < a.m; r++) {
    for (let o = 0; o < a.out; o++) {
      let s = 0;
      for (let i = 0; i < a.in; i++) s += x[r * a.in + i] * w[o * a.in + i];
      let lora = 0;
      for (let j = 0; j < a.rank; j++) lora += h[r * a.rank + j] * a.loraB![o * a.rank + j];
      y[r * a.out + o] = s + a.scale * lora;
    }
  }
  return y;
}

/**
 * The activations of the CPU's int8 GEMV (qalora_common.h act_scale, act_quantize), per row and block of 32
 * inputs, in fp32 steps: d = max|x| / 127, x_q = clamp(rint(x·(1/d)), ±127), 0 when d = 0.
 */
export function quantizeActivations(x: ArrayLike<number>, m: number, inF: number): { q: Int8Array; d: Float32Array } {
  if (inF % 32 !== 0) throw new Error(`int8 activations need in to be a multiple of 32, got ${inF}`);
  const f = Math.fround;
  const q = new Int8Array(m * inF);
  const d = new Float32Array((m * inF) / 32);
  for (let b = 0; b < d.length; b++) {
    let amax = 0;
    for (let i = 32 * b; i < 32 * b + 32; i++) amax = Math.max(amax, Math.abs(f(x[i])));
    const scale = f(amax / 127);
    const inv = scale > 0 ? f(1 / scale) : 0;
    for (let i = 32 * b; i < 32 * b + 32; i++) q[i] = Math.min(127, Math.max(-127, rintEven(f(f(x[i]) * inv))));
    d[b] = scale;
  }
  return { q, d };
}

/**
 * forward with int8 activations (LayerArgs.int8_activations, groups of whole 32-blocks):
 * y = Σ_k α_k·Σ_{blocks b of k} d_b·Σ_{i∈b} q_i·x_q,i + Σ_k β_k·Σ_{i∈k} x_i + s·(p·Aᵀ)·Bᵀ — only the α term sees x_q.
 */
export function forwardInt8(a: RefLayerArgs, x: ArrayLike<number>): Float64Array {
  const L = checkGroup(a.in, a.group);
  if (a.group % 32 !== 0) throw new Error(`int8 activations need groups of whole 32-blocks, got ${a.group}`);
  const wpr = wordsPerRow(a.in, a.bits);
  const { q: xq, d } = quantizeActivations(x, a.m, a.in);
  const h = a.rank > 0 ? lowRank(a, pooled(a, x)) : new Float64Array(0);
  const y = new Float64Array(a.m * a.out);
  for (let r = 0; r < a.m; r++) {
    for (let o = 0; o < a.out; o++) {
      let s = 0;
      for (let k = 0; k < L; k++) {
        let dots = 0;
        let sumX = 0;
        for (let b = (k * a.group) / 32; b < ((k + 1) * a.group) / 32; b++) {
          let dot = 0;
          for (let i = 32 * b; i < 32 * b + 32; i++) dot += unpackQ(a.qweight, o * wpr, i, a.bits) * xq[r * a.in + i];
          dots += d[(r * a.in) / 32 + b] * dot;
        }
        for (let i = k * a.group; i < (k + 1) * a.group; i++) sumX += x[r * a.in + i];
        s += a.alpha[o * L + k] * dots + a.beta[o * L + k] * sumX;
      }
      let lora = 0;
      for (let j = 0; j < a.rank; j++) lora += h[r * a.rank + j] * a.loraB![o * a.rank + j];
      y[r * a.out + o] = s + a.scale * lora;
    }
  }
  return y;
}

export interface RefGradients {
  dx: Float64Array;
  gradA: Float64Array;
  gradB: Float64Array;
}

/** dB = s·dyᵀ·h; dh = s·dy·B; dA = dhᵀ·p; dp = drop'(dh·A); dx = dy·Ŵ + c·expand(dp). */
export function backward(a: RefLayerArgs, x: ArrayLike<number>, dy: ArrayLike<number>): RefGradients {
  const L = checkGroup(a.in, a.group);
  const w = dequantize(a.qweight, a.alpha, a.beta, a.out, a.in, a.bits, a.group);
  const dx = new Float64Array(a.m * a.in);
  for (let r = 0; r < a.m; r++) {
    for (let i = 0; i < a.in; i++) {
      let s = 0;
      for (let o = 0; o < a.out; o++) s += dy[r * a.out + o] * w[o * a.in + i];
      dx[r * a.in + i] = s;
    }
  }
  const gradA = new Float64Array(a.rank * L);
  const gradB = new Float64Array(a.out * a.rank);
  if (a.rank === 0) return { dx, gradA, gradB };
  const p = pooled(a, x);
  const h = lowRank(a, p);
  for (let o = 0; o < a.out; o++) {
    for (let j = 0; j < a.rank; j++) {
      let s = 0;
      for (let r = 0; r < a.m; r++) s += dy[r * a.out + o] * h[r * a.rank + j];
      gradB[o * a.rank + j] = a.scale * s;
    }
  }
  const dh = new Float64Array(a.m * a.rank);
  for (let r = 0; r < a.m; r++) {
    for (let j = 0; j < a.rank; j++) {
      let s = 0;
      for (let o = 0; o < a.out; o++) s += dy[r * a.out + o] * a.loraB![o * a.rank + j];
      dh[r * a.rank + j] = a.scale * s;
    }
  }
  for (let j = 0; j < a.rank; j++) {
    for (let k = 0; k < L; k++) {
      let s = 0;
      for (let r = 0; r < a.m; r++) s += dh[r * a.rank + j] * p[r * L + k];
      gradA[j * L + k] = s;
    }
  }
  for (let r = 0; r < a.m; r++) {
    for (let k = 0; k < L; k++) {
      let dp = 0;
      for (let j = 0; j < a.rank; j++) dp += dh[r * a.rank + j] * a.loraA![j * L + k];
      if (a.pool !== 'peft') dp *= dropFactor(a, r * L + k);
      for (let i = k * a.group; i < (k + 1) * a.group; i++) {
        const idx = r * a.in + i;
        dx[idx] += a.poolScale * dp * (a.pool === 'peft' ? dropFactor(a, idx) : 1);
      }
    }
  }
  return { dx, gradA, gradB };
}

/** β' = β + s·c·(B·A); q and α are unchanged by construction. */
export function merge(a: RefLayerArgs): Float64Array {
  const L = checkGroup(a.in, a.group);
  const betaOut = Float64Array.from(a.beta);
  for (let o = 0; o < a.out; o++) {
    for (let k = 0; k < L; k++) {
      let s = 0;
      for (let j = 0; j < a.rank; j++) s += a.loraB![o * a.rank + j] * a.loraA![j * L + k];
      betaOut[o * L + k] += a.scale * a.poolScale * s;
    }
  }
  return betaOut;
}
