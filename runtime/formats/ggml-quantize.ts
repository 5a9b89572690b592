// ggml's reference quantizers for the block types a QA-LoRA base holds exactly (Q4_0, Q4_1, Q8_0), written from
// the block definitions (notes §2) as llama.cpp's quantize_row_*_ref compute them: fp32 arithmetic, the scale
// stored as fp16 after q is computed against the unrounded one, every operation rounded to fp32 on its own (the
// library node-llama-cpp ships does not fuse `x·id + 8.5` into one multiply-add: test/tables.test.ts checks
// these bytes against it, on blocks where fusing would change a nibble). A spec's `tables q8_0` quantizes the token tables
// with these, so a GGUF export writes the same blocks llama.cpp's own tool would; tests use them to make
// Q4_0/Q4_1/Q8_0 files of a real model.
import { QaloraError } from '../errors.ts';
import { f32ToF16Bits } from '../safetensors.ts';
import { EXACT_BLOCK_TYPES } from './ggml-blocks.ts';
import { GgmlType } from './ggml-types.ts';

const fr = Math.fround;
/** C's roundf: halves away from zero (Math.round takes them up). */
const roundf = (v: number) => Math.sign(v) * Math.round(Math.abs(v));

/** W [rows, cols] row-major (cols a multiple of 32) as blocks of `type` along each row. */
export function quantizeGgml(type: number, w: Float32Array, rows: number, cols: number): Uint8Array {
  const info = EXACT_BLOCK_TYPES.get(type);
  if (!info) throw new QaloraError(`quantizeGgml: no quantizer for ggml type ${type}`);
  if (cols % 32 !== 0) throw new QaloraError(`quantizeGgml: rows of ${cols} values are not whole blocks of 32`);
  const bb = info.blockBytes, blocks = (rows * cols) / 32;
  const out = new Uint8Array(blocks * bb);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < blocks; b++) {
    const x = w.subarray(b * 32, b * 32 + 32), o = b * bb;
    if (type === GgmlType.Q8_0) {
      let amax = 0;
      for (const v of x) amax = Math.max(amax, Math.abs(v));
      const d = fr(amax / 127), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      for (let j = 0; j < 32; j++) dv.setInt8(o + 2 + j, roundf(fr(x[j] * id)));
    } else if (type === GgmlType.Q4_0) {
      // d = max / −8 where max is the value of largest magnitude; q = (int8)(x/d + 8.5) capped at 15.
      let max = 0;
      for (const v of x) if (Math.abs(v) > Math.abs(max)) max = v;
      const d = fr(max / -8), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      const q = (v: number) => Math.min(15, Math.trunc(fr(fr(v * id) + 8.5)));
      for (let j = 0; j < 16; j++) out[o + 2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    } else {
      // d = (max − min) / 15, m = min; q = (int8)((x − min)/d + 0.5) capped at 15.
      let lo = Infinity, hi = -Infinity;
      for (const v of x) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      const d = fr(fr(hi - lo) / 15), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      dv.setUint16(o + 2, f32ToF16Bits(lo), true);
      const q = (v: number) => Math.min(15, Math.trunc(fr(fr(fr(v - lo) * id) + 0.5)));
      for (let j = 0; j < 16; j++) out[o + 4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
  }
  return out;
}
