// α and β storage (`scales fp32 | fp16`): the one place that turns a ScaleArray into values and back, so no
// caller indexes a Uint16Array of fp16 bits as if it held numbers. fp16 rounding is round-to-nearest-even, the
// same bits as f32_to_f16 in templates/common/qalora_common.h.
import type { ScaleDType } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { f16ToF32, f32ToF16 } from '../reference/numeric.ts';
import type { QuantLinear, ScaleArray } from './types.ts';

export function scaleDTypeOf(a: ScaleArray): ScaleDType {
  return a instanceof Uint16Array ? 'fp16' : 'fp32';
}

export function newScales(t: ScaleDType, n: number): ScaleArray {
  return t === 'fp16' ? new Uint16Array(n) : new Float32Array(n);
}

/** The values as fp32: the array itself for fp32 storage, a widened copy (exact) for fp16. */
export function scaleValues(a: ScaleArray): Float32Array {
  if (a instanceof Float32Array) return a;
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f16ToF32(a[i]);
  return out;
}

/** Values stored as `t`: fp32 (Math.fround), or fp16 rounded to nearest even. */
export function storeScales(values: ArrayLike<number>, t: ScaleDType): ScaleArray {
  if (t === 'fp32') return Float32Array.from(values as ArrayLike<number>);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToF16(values[i]);
  return out;
}

/** Whether fp32 values survive fp16 storage unchanged (then narrowing them is exact). */
export function fitsF16(values: ArrayLike<number>): boolean {
  for (let i = 0; i < values.length; i++) if (f16ToF32(f32ToF16(values[i])) !== values[i]) return false;
  return true;
}

/** The settings' scale storage; files and specs written before `scales` existed mean fp32. */
export function scalesOf(s: { scales?: ScaleDType }): ScaleDType {
  return s.scales ?? 'fp32';
}

/** Throws when a layer's arrays are not the storage its settings name (a loader or converter bug). */
export function checkScales(lin: QuantLinear, where: string): void {
  const want = scalesOf(lin.settings);
  if (scaleDTypeOf(lin.alpha) !== want || scaleDTypeOf(lin.beta) !== want) {
    throw new QaloraError(`${where}: alpha/beta are ${lin.alpha.constructor.name}/${lin.beta.constructor.name} but the layer's scales are ${want}`);
  }
}

/**
 * The layer with its α and β stored as `t`. Widening fp16 → fp32 is exact; narrowing is exact only when every
 * value fits fp16 (GGUF-born layers, for instance) — otherwise it is refused here (requantize instead: rounding
 * α and β without recomputing q breaks the quantization rule). q is shared, never copied.
 */
export function withScales(lin: QuantLinear, t: ScaleDType, where: string): QuantLinear {
  const from = scalesOf(lin.settings);
  if (from === t && scaleDTypeOf(lin.alpha) === t) return lin;
  const alpha = scaleValues(lin.alpha), beta = scaleValues(lin.beta);
  if (t === 'fp16' && !(fitsF16(alpha) && fitsF16(beta))) {
    throw new QaloraError(`${where}: the layer's fp32 scales do not fit fp16 exactly; the spec asks for \`scales fp16\` — drop it, or requantize (--requantize)`);
  }
  return { ...lin, settings: { ...lin.settings, scales: t }, alpha: storeScales(alpha, t), beta: storeScales(beta, t) };
}
