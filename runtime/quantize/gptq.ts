// GPTQ driver: accumulate a layer's input Hessian from calibration activations, then quantize its float weight
// into our (q blocked32, α, β) layout with the native GPTQ (templates/core/gptq.cpp). Collecting the activations
// per layer (running the model on calibration text) is the caller's job; this module only needs X or H.
import type { Bits, QaloraSettings } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { FloatLinear, QuantLinear } from '../model/types.ts';

/** The two native ops (addon.core of any built addon, e.g. loadCore()). */
export interface GptqNative {
  gptq_hessian_accumulate(x: Float32Array, rows: number, nIn: number, h: Float32Array, seen: number): void;
  gptq_quantize(
    w: Float32Array, h: Float32Array, nOut: number, nIn: number, bits: number, group: number, block: number, damp: number,
    qweight: Uint32Array, alpha: Float32Array, beta: Float32Array,
  ): number;
}

export interface GptqOptions {
  bits: Bits;
  group: number;
  /** Columns per lazy batch update (rounded to whole groups); GPTQ's default 128. */
  block?: number;
  /** Dampening as a fraction of the mean diagonal of H (GPTQ's percdamp); default 0.01. */
  damp?: number;
}

export interface GptqResult {
  qweight: Uint32Array;
  alpha: Float32Array;
  beta: Float32Array;
  /** Ŵ = α·q + β, [out, in]. */
  dequantized: Float32Array;
  /** GPTQ's objective Σ (w − ŵ)² / (2·[H⁻¹]ᵢᵢ) summed over the layer. */
  loss: number;
}

/** H = 2·XᵀX / n accumulated over batches of calibration rows of one layer's input. */
export class HessianAccumulator {
  readonly h: Float32Array;
  private seen = 0;
  constructor(private readonly native: GptqNative, readonly inFeatures: number) {
    this.h = new Float32Array(inFeatures * inFeatures);
  }
  /** x: [rows, in] row-major activations entering the layer. */
  add(x: Float32Array, rows = x.length / this.inFeatures): void {
    if (!Number.isInteger(rows) || rows * this.inFeatures !== x.length) {
      throw new QaloraError(`GPTQ calibration: ${x.length} activations are not rows of ${this.inFeatures} inputs`);
    }
    if (rows === 0) return;
    if (!x.every(Number.isFinite)) throw new QaloraError('GPTQ calibration: activations contain NaN or infinity');
    this.native.gptq_hessian_accumulate(x, rows, this.inFeatures, this.h, this.seen);
    this.seen += rows;
  }
  get rows(): number {
    return this.seen;
  }
}

/** GPTQ of a float W [out, in] given its input Hessian H [in, in]; W is not modified. */
export function gptqQuantize(native: GptqNative, w: Float32Array, out: number, inF: number, h: Float32Array, opts: GptqOptions): GptqResult {
  const { bits, group } = opts;
  if (![2, 3, 4, 8].includes(bits)) throw new QaloraError(`GPTQ: bits ${bits} is not supported (2, 3, 4, 8)`);
  if (!(Number.isInteger(group) && group > 0 && inF % group === 0)) throw new QaloraError(`GPTQ: group ${group} must divide in_features ${inF}`);
  if (w.length !== out * inF) throw new QaloraError(`GPTQ: weight has ${w.length} values, expected out ${out} × in ${inF}`);
  if (h.length !== inF * inF) throw new QaloraError(`GPTQ: Hessian has ${h.length} values, expected ${inF}×${inF}`);
  const dequantized = w.slice();
  const L = inF / group;
  const qweight = new Uint32Array(out * Math.ceil(inF / 32) * bits);
  const alpha = new Float32Array(out * L);
  const beta = new Float32Array(out * L);
  const loss = native.gptq_quantize(dequantized, h, out, inF, bits, group, opts.block ?? 128, opts.damp ?? 0.01, qweight, alpha, beta);
  if (Number.isNaN(loss)) {
    throw new QaloraError(`GPTQ: the Hessian of this ${out}×${inF} layer is not positive definite even with heavy dampening (NaN activations, or too little calibration data?)`);
  }
  return { qweight, alpha, beta, dequantized, loss };
}

/** A float projection → the QuantLinear base layer of `settings` (bits and group from the settings). */
export function gptqQuantizeLinear(native: GptqNative, lin: FloatLinear, h: Float32Array, settings: QaloraSettings, opts: { block?: number; damp?: number } = {}): QuantLinear {
  // GPTQ compensates each column's error against the fp32 α and β it chose: rounding them afterwards would
  // undo part of that, and the native pass has no fp16 form yet.
  if ((settings.scales ?? 'fp32') === 'fp16') throw new QaloraError('GPTQ quantization computes fp32 scales; use `scales fp32` with --method gptq, or RTN (the default) for `scales fp16`');
  const r = gptqQuantize(native, lin.w, lin.out, lin.in, h, { bits: settings.bits, group: settings.group, ...opts });
  return { kind: 'quant', out: lin.out, in: lin.in, settings, qweight: r.qweight, alpha: r.alpha, beta: r.beta };
}
