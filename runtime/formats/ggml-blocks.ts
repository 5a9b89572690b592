// ggml's Q4_0 / Q4_1 / Q8_0 blocks as QA-LoRA bases, exactly and without a float round trip. Each block of 32
// inputs is one group of 32: Q4_1 (d, m, 16 bytes of nibbles) is α = d, β = m; Q4_0 ((n − 8)·d) is α = d,
// β = −8d; Q8_0 (i8·d) is q = i8 + 128 with α = d, β = −128d (the products are exact in fp32, so the base
// dequantizes to the file's values bit for bit). The conversion works a u32 word at a time: a 7B model has
// 0.8 G packed words, and a per-element loop would dominate its load time.
// With `scales fp16` (what specOfQuantized picks for these files) d and m are copied as the file's bits — 20%
// less memory than fp32 α/β at g 32 — and −8d, −128d are exact in fp16 (a power-of-two multiple); with fp32
// scales they are widened, also exactly.
import type { QaloraSettings } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { scaleValues } from '../model/scales.ts';
import type { QuantLinear, ScaleArray } from '../model/types.ts';
import { f16BitsToF32, f32ToF16Bits } from '../safetensors.ts';
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

/** Fills `target` with the tensor's bytes from `at` on (GgufTensor.readInto). */
export type BlockReader = (target: Uint8Array, at: number) => void;

/** Bytes converted per slice: large enough for long reads, small enough to stay in cache and never page-fault. */
const SLICE_BYTES = 1 << 22;
let slice = new Uint8Array(0);

/**
 * A [out, in] tensor of `type` blocks (dims [in, out] in GGUF) as a group-32 QuantLinear; null when the type
 * has no exact QA-LoRA form. `src` is the tensor's bytes, or a reader the conversion pulls a few MiB at a time
 * through one reused buffer. `settings` are the adapter's (rank, alpha, …); bits and group come from the blocks.
 */
export function blocksToQuantLinear(type: number, src: Uint8Array | BlockReader, out: number, inF: number, settings: Partial<QaloraSettings> = {}): QuantLinear | null {
  const info = EXACT_BLOCK_TYPES.get(type);
  if (!info || inF % 32 !== 0) return null;
  const L = inF / 32, bits = info.bits, bb = info.blockBytes;
  const scales = settings.scales ?? 'fp32';
  const qweight = new Uint32Array(out * L * bits);
  const alpha: ScaleArray = scales === 'fp16' ? new Uint16Array(out * L) : new Float32Array(out * L);
  const beta: ScaleArray = scales === 'fp16' ? new Uint16Array(out * L) : new Float32Array(out * L);
  const n = out * L;
  if (src instanceof Uint8Array) {
    // Every block type here has 2-byte-aligned fields (block sizes 18, 20, 34): read them as u16 lanes.
    const u16 = src.byteOffset % 2 === 0 ? new Uint16Array(src.buffer, src.byteOffset, src.byteLength >> 1) : new Uint16Array(src.slice().buffer);
    convertBlocks(type, u16, 0, n, qweight, alpha, beta);
  } else {
    const perSlice = Math.max(1, Math.floor(SLICE_BYTES / bb));
    if (slice.byteLength < perSlice * bb) slice = new Uint8Array(perSlice * bb + 1);
    const u16 = new Uint16Array(slice.buffer, 0, (perSlice * bb) >> 1);
    for (let g0 = 0; g0 < n; g0 += perSlice) {
      const count = Math.min(perSlice, n - g0);
      src(slice.subarray(0, count * bb), g0 * bb);
      convertBlocks(type, u16, g0, count, qweight, alpha, beta);
    }
  }
  const full: QaloraSettings = { rank: 0, alpha: 0, dropout: 0, pool: 'mean', dtype: 'fp32', ...settings, scales, bits, group: 32 };
  return { kind: 'quant', out, in: inF, settings: full, qweight, alpha, beta };
}

/** True when every α is an fp16 value and β = k·α in every group: the layer came from Q4_0 (k = −8) or Q8_0 (k = −128). */
export function symmetricBlocks(lin: QuantLinear, k: number): boolean {
  const alpha = scaleValues(lin.alpha), beta = scaleValues(lin.beta);
  for (let i = 0; i < alpha.length; i++) {
    const a = alpha[i];
    if (f16BitsToF32(f32ToF16Bits(a)) !== a || beta[i] !== Math.fround(k * a)) return false;
  }
  return true;
}

/** −2^k·d as fp16 bits, from d's bits: the exponent moves by k (exact); anything else must round-trip exactly. */
function negPow2F16(h: number, k: number): number {
  const e = (h >> 10) & 31;
  if (e > 0 && e + k < 31) return (h + (k << 10)) ^ 0x8000;
  const v = -(2 ** k) * F16[h], bits = f32ToF16Bits(v);
  if (F16[bits] !== v && !Number.isNaN(v)) throw new QaloraError(`a block scale d = ${F16[h]} times −${2 ** k} does not fit fp16; use \`scales fp32\``);
  return bits;
}

/** Blocks [g0, g0 + count) of the tensor, whose bytes start at u16[0], into the base's arrays. */
function convertBlocks(type: number, u16: Uint16Array, g0: number, count: number, qweight: Uint32Array, alpha: ScaleArray, beta: ScaleArray): void {
  const hw = EXACT_BLOCK_TYPES.get(type)!.blockBytes >> 1;
  const end = g0 + count;
  const f16 = alpha instanceof Uint16Array; // copy the file's bits; else widen them (exact either way)
  if (type === GgmlType.Q8_0) {
    for (let g = g0, h = 0, w = g0 * 8; g < end; g++, h += hw, w += 8) {
      if (f16) {
        alpha[g] = u16[h];
        beta[g] = negPow2F16(u16[h], 7);
      } else {
        const d = F16[u16[h]];
        alpha[g] = d;
        beta[g] = -128 * d;
      }
      // q = i8 + 128 flips the sign bit of each byte; 8-bit blocked32 keeps the bytes in order.
      for (let j = 0; j < 8; j++) qweight[w + j] = ((u16[h + 1 + 2 * j] | (u16[h + 2 + 2 * j] << 16)) ^ 0x80808080) >>> 0;
    }
    return;
  }
  const q41 = type === GgmlType.Q4_1, qs = q41 ? 2 : 1;
  for (let g = g0, h = 0, w = g0 * 4; g < end; g++, h += hw, w += 4) {
    if (f16) {
      alpha[g] = u16[h];
      beta[g] = q41 ? u16[h + 1] : negPow2F16(u16[h], 3);
    } else {
      const d = F16[u16[h]];
      alpha[g] = d;
      beta[g] = q41 ? F16[u16[h + 1]] : -8 * d;
    }
    // ggml: byte j holds input j (low nibble) and j + 16 (high); blocked32: word k holds inputs 8k..8k+7.
    const q = h + qs;
    const b0 = u16[q] | (u16[q + 1] << 16), b1 = u16[q + 2] | (u16[q + 3] << 16);
    const b2 = u16[q + 4] | (u16[q + 5] << 16), b3 = u16[q + 6] | (u16[q + 7] << 16);
    qweight[w] = (nibbles4(b0) | (nibbles4(b1) << 16)) >>> 0;
    qweight[w + 1] = (nibbles4(b2) | (nibbles4(b3) << 16)) >>> 0;
    qweight[w + 2] = (nibbles4(b0 >>> 4) | (nibbles4(b1 >>> 4) << 16)) >>> 0;
    qweight[w + 3] = (nibbles4(b2 >>> 4) | (nibbles4(b3 >>> 4) << 16)) >>> 0;
  }
}
