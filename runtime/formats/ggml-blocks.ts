// ggml's Q4_0 / Q4_1 / Q8_0 blocks as QA-LoRA bases, exactly and without a float round trip. Each block of 32
// inputs is one group of 32: Q4_1 (d, m, 16 bytes of nibbles) is α = d, β = m; Q4_0 ((n − 8)·d) is α = d,
// β = −8d; Q8_0 (i8·d) is q = i8 + 128 with α = d, β = −128d (the products are exact in fp32, so the base
// dequantizes to the file's values bit for bit). The conversion works a u32 word at a time: a 7B model has
// 0.8 G packed words, and a per-element loop would dominate its load time.
import type { QaloraSettings } from '../../dsl/resolved.ts';
import type { QuantLinear } from '../model/types.ts';
import { f16BitsToF32 } from '../safetensors.ts';
import { GgmlType } from './ggml-types.ts';

/** The block types a QA-LoRA base holds exactly, with their bits and block size in bytes. */
export const EXACT_BLOCK_TYPES: ReadonlyMap<number, { bits: 4 | 8; blockBytes: number; name: string }> = new Map([
  [GgmlType.Q4_0, { bits: 4, blockBytes: 18, name: 'Q4_0' }],
  [GgmlType.Q4_1, { bits: 4, blockBytes: 20, name: 'Q4_1' }],
  [GgmlType.Q8_0, { bits: 8, blockBytes: 34, name: 'Q8_0' }],
]);

const F16 = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) t[h] = f16BitsToF32(h);
  return t;
})();

/** Packs the low nibbles of the 4 bytes of v (lanes 0..3) into 16 bits, lane i at bits 4i. */
function nibbles4(v: number): number {
  const t = (v & 0x0f0f0f0f) | ((v & 0x0f0f0f0f) >>> 4);
  return (t & 0xff) | ((t >>> 8) & 0xff00);
}

/**
 * A [out, in] tensor of `type` blocks (dims [in, out] in GGUF) as a group-32 QuantLinear; null when the type
 * has no exact QA-LoRA form. `settings` are the adapter's (rank, alpha, …); bits and group come from the blocks.
 */
export function blocksToQuantLinear(type: number, bytes: Uint8Array, out: number, inF: number, settings: Partial<QaloraSettings> = {}): QuantLinear | null {
  const info = EXACT_BLOCK_TYPES.get(type);
  if (!info || inF % 32 !== 0) return null;
  const L = inF / 32, bits = info.bits, bb = info.blockBytes;
  const qweight = new Uint32Array(out * L * bits);
  const alpha = new Float32Array(out * L);
  const beta = new Float32Array(out * L);
  const u8 = bytes;
  const u16 = (o: number) => u8[o] | (u8[o + 1] << 8);
  const u32 = (o: number) => (u8[o] | (u8[o + 1] << 8) | (u8[o + 2] << 16) | (u8[o + 3] << 24)) >>> 0;
  const n = out * L;
  for (let g = 0; g < n; g++) {
    const o = g * bb, w = g * bits;
    const d = F16[u16(o)];
    alpha[g] = d;
    if (type === GgmlType.Q8_0) {
      beta[g] = -128 * d;
      // q = i8 + 128 flips the sign bit of each byte; 8-bit blocked32 keeps the bytes in order.
      for (let j = 0; j < 8; j++) qweight[w + j] = (u32(o + 2 + 4 * j) ^ 0x80808080) >>> 0;
      continue;
    }
    const qs = type === GgmlType.Q4_1 ? o + 4 : o + 2;
    beta[g] = type === GgmlType.Q4_1 ? F16[u16(o + 2)] : -8 * d;
    // ggml: byte j holds input j (low nibble) and j + 16 (high); blocked32: word k holds inputs 8k..8k+7.
    const b0 = u32(qs), b1 = u32(qs + 4), b2 = u32(qs + 8), b3 = u32(qs + 12);
    qweight[w] = (nibbles4(b0) | (nibbles4(b1) << 16)) >>> 0;
    qweight[w + 1] = (nibbles4(b2) | (nibbles4(b3) << 16)) >>> 0;
    qweight[w + 2] = (nibbles4(b0 >>> 4) | (nibbles4(b1 >>> 4) << 16)) >>> 0;
    qweight[w + 3] = (nibbles4(b2 >>> 4) | (nibbles4(b3 >>> 4) << 16)) >>> 0;
  }
  const full: QaloraSettings = { rank: 0, alpha: 0, dropout: 0, pool: 'mean', dtype: 'fp32', ...settings, bits, group: 32 };
  return { kind: 'quant', out, in: inF, settings: full, qweight, alpha, beta };
}
