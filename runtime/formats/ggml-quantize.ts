// ggml's reference quantizers for the block types a QA-LoRA base holds exactly (Q4_0, Q4_1, Q8_0), written from
// the block definitions (notes §2) as llama.cpp's quantize_row_*_ref compute them: fp32 arithmetic, the scale
// stored as fp16 after q is computed against the unrounded one, every operation rounded to fp32 on its own (the
// library node-llama-cpp ships does not fuse `x·id + 8.5` into one multiply-add). test/tables.test.ts checks these
// bytes against that library, on blocks where fusing would change a nibble. A spec's `tables q8_0` quantizes the
// token tables with these, so a GGUF export writes the blocks llama.cpp's own tool would; tests use them to make
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
  // Indexed loops, one block type per loop: this runs over whole token tables (65 M values at TinyLlama's size).
  if (type === GgmlType.Q8_0) {
    const i8 = new Int8Array(out.buffer);
    for (let b = 0, x = 0, o = 0; b < blocks; b++, x += 32, o += bb) {
      let amax = 0;
      for (let j = x; j < x + 32; j++) amax = Math.max(amax, Math.abs(w[j]));
      const d = fr(amax / 127), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      for (let j = 0; j < 32; j++) i8[o + 2 + j] = roundf(fr(w[x + j] * id));
    }
  } else if (type === GgmlType.Q4_0) {
    // d = max / −8 where max is the value of largest magnitude; q = (int8)(x/d + 8.5) capped at 15.
    for (let b = 0, x = 0, o = 0; b < blocks; b++, x += 32, o += bb) {
      let max = 0;
      for (let j = x; j < x + 32; j++) if (Math.abs(w[j]) > Math.abs(max)) max = w[j];
      const d = fr(max / -8), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      for (let j = 0; j < 16; j++) {
        const q0 = Math.min(15, Math.trunc(fr(fr(w[x + j] * id) + 8.5))), q1 = Math.min(15, Math.trunc(fr(fr(w[x + j + 16] * id) + 8.5)));
        out[o + 2 + j] = q0 | (q1 << 4);
      }
    }
  } else {
    // d = (max − min) / 15, m = min; q = (int8)((x − min)/d + 0.5) capped at 15.
    for (let b = 0, x = 0, o = 0; b < blocks; b++, x += 32, o += bb) {
      let lo = Infinity, hi = -Infinity;
      for (let j = x; j < x + 32; j++) {
        lo = Math.min(lo, w[j]);
        hi = Math.max(hi, w[j]);
      }
      const d = fr(fr(hi - lo) / 15), id = d ? fr(1 / d) : 0;
      dv.setUint16(o, f32ToF16Bits(d), true);
      dv.setUint16(o + 2, f32ToF16Bits(lo), true);
      for (let j = 0; j < 16; j++) {
        const q0 = Math.min(15, Math.trunc(fr(fr(fr(w[x + j] - lo) * id) + 0.5))), q1 = Math.min(15, Math.trunc(fr(fr(fr(w[x + j + 16] - lo) * id) + 0.5)));
        out[o + 4 + j] = q0 | (q1 << 4);
      }
    }
  }
  return out;
}
