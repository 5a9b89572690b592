// Test-side ggml encoders, written from the block definitions (notes §2) as llama.cpp's quantize does, so the
// tests can make Q4_0 / Q4_1 / Q8_0 GGUF files of a real model without llama.cpp's tools.
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import { f16BitsToF32, f32ToF16Bits } from '../runtime/safetensors.ts';

/** W [rows, cols] row-major (cols a multiple of 32) as blocks of `type` along each row. */
export function encodeGgml(type: number, w: Float32Array, rows: number, cols: number): Uint8Array {
  const bb = type === GgmlType.Q4_0 ? 18 : type === GgmlType.Q4_1 ? 20 : 34;
  const blocks = (rows * cols) / 32;
  const out = new Uint8Array(blocks * bb);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < blocks; b++) {
    const x = w.subarray(b * 32, b * 32 + 32), o = b * bb;
    if (type === GgmlType.Q8_0) {
      let amax = 0;
      for (const v of x) amax = Math.max(amax, Math.abs(v));
      const d = amax / 127, id = d ? 1 / d : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      for (let j = 0; j < 32; j++) dv.setInt8(o + 2 + j, Math.round(x[j] * id));
    } else if (type === GgmlType.Q4_0) {
      // ggml: d = max / −8 where max is the value of largest magnitude, q = round(x/d + 8) clamped to 15.
      let max = 0;
      for (const v of x) if (Math.abs(v) > Math.abs(max)) max = v;
      const d = max / -8, id = d ? 1 / d : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      const q = (v: number) => Math.min(15, Math.max(0, Math.round(v * id + 8)));
      for (let j = 0; j < 16; j++) out[o + 2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    } else {
      let lo = Infinity, hi = -Infinity;
      for (const v of x) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      const d = (hi - lo) / 15, id = d ? 1 / d : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      dv.setUint16(o + 2, f32ToF16Bits(lo), true);
      const m = f16BitsToF32(f32ToF16Bits(lo));
      const q = (v: number) => Math.min(15, Math.max(0, Math.round((v - m) * id)));
      for (let j = 0; j < 16; j++) out[o + 4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
  }
  return out;
}
