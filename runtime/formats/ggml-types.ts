// ggml tensor types: block geometry and dequantization to F32 (notes §2). Quantized types are blocks of 32
// elements along dims[0] (the contiguous dimension).
import { QaloraError } from '../errors.ts';
import { bf16ToF32Array, f16BitsToF32, f16ToF32Array } from '../safetensors.ts';

export const GgmlType = {
  F32: 0, F16: 1, Q4_0: 2, Q4_1: 3, Q5_0: 6, Q5_1: 7, Q8_0: 8, I8: 24, I16: 25, I32: 26, I64: 27, F64: 28, BF16: 30,
} as const;
export type GgmlTypeName = keyof typeof GgmlType;

interface TypeInfo { name: GgmlTypeName; blockElems: number; blockBytes: number }

const INFO = new Map<number, TypeInfo>([
  [0, { name: 'F32', blockElems: 1, blockBytes: 4 }],
  [1, { name: 'F16', blockElems: 1, blockBytes: 2 }],
  [2, { name: 'Q4_0', blockElems: 32, blockBytes: 18 }],
  [3, { name: 'Q4_1', blockElems: 32, blockBytes: 20 }],
  [6, { name: 'Q5_0', blockElems: 32, blockBytes: 22 }],
  [7, { name: 'Q5_1', blockElems: 32, blockBytes: 24 }],
  [8, { name: 'Q8_0', blockElems: 32, blockBytes: 34 }],
  [24, { name: 'I8', blockElems: 1, blockBytes: 1 }],
  [25, { name: 'I16', blockElems: 1, blockBytes: 2 }],
  [26, { name: 'I32', blockElems: 1, blockBytes: 4 }],
  [27, { name: 'I64', blockElems: 1, blockBytes: 8 }],
  [28, { name: 'F64', blockElems: 1, blockBytes: 8 }],
  [30, { name: 'BF16', blockElems: 1, blockBytes: 2 }],
]);

/** ggml type ids this reader does not dequantize, named so the error can say what the file holds. */
const KNOWN_UNSUPPORTED: Record<number, string> = {
  9: 'Q8_1', 10: 'Q2_K', 11: 'Q3_K', 12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS',
  18: 'IQ3_XXS', 19: 'IQ1_S', 20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 29: 'IQ1_M',
};

export function ggmlTypeName(type: number): string {
  return INFO.get(type)?.name ?? KNOWN_UNSUPPORTED[type] ?? `type ${type}`;
}

export function ggmlTypeInfo(type: number, where: string): TypeInfo {
  const info = INFO.get(type);
  if (!info) {
    throw new QaloraError(`${where}: unsupported ggml tensor type ${ggmlTypeName(type)} (supported: ${[...INFO.values()].map((i) => i.name).join(', ')})`);
  }
  return info;
}

/** Bytes of a tensor of `elems` elements whose contiguous dimension is `dim0`. */
export function ggmlBytes(type: number, dim0: number, elems: number, where: string): number {
  const info = ggmlTypeInfo(type, where);
  if (dim0 % info.blockElems !== 0) {
    throw new QaloraError(`${where}: ${info.name} needs dims[0] to be a multiple of ${info.blockElems}, got ${dim0}`);
  }
  return (elems / info.blockElems) * info.blockBytes;
}

function u16s(bytes: Uint8Array): Uint16Array {
  return bytes.byteOffset % 2 === 0
    ? new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2)
    : new Uint16Array(bytes.slice().buffer);
}

const fr = Math.fround;

/** Dequantizes `elems` elements of raw ggml data to F32. */
export function dequantize(type: number, bytes: Uint8Array, elems: number, where: string): Float32Array {
  const info = ggmlTypeInfo(type, where);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (info.name) {
    case 'F32': return bytes.byteOffset % 4 === 0 ? new Float32Array(bytes.buffer, bytes.byteOffset, elems).slice() : new Float32Array(bytes.slice().buffer);
    case 'F16': return f16ToF32Array(u16s(bytes));
    case 'BF16': return bf16ToF32Array(u16s(bytes));
    case 'I8': return Float32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, elems));
    case 'I16': return Float32Array.from({ length: elems }, (_, i) => dv.getInt16(2 * i, true));
    case 'I32': return Float32Array.from({ length: elems }, (_, i) => dv.getInt32(4 * i, true));
    case 'I64': return Float32Array.from({ length: elems }, (_, i) => Number(dv.getBigInt64(8 * i, true)));
    case 'F64': return Float32Array.from({ length: elems }, (_, i) => dv.getFloat64(8 * i, true));
    default: break;
  }
  const out = new Float32Array(elems);
  const blocks = elems / 32;
  const bb = info.blockBytes;
  for (let b = 0; b < blocks; b++) {
    const o = b * bb;
    const y = b * 32;
    const d = f16BitsToF32(dv.getUint16(o, true));
    switch (info.name) {
      case 'Q4_0':
        for (let j = 0; j < 16; j++) {
          const q = bytes[o + 2 + j];
          out[y + j] = ((q & 15) - 8) * d;
          out[y + j + 16] = ((q >> 4) - 8) * d;
        }
        break;
      case 'Q4_1': {
        const m = f16BitsToF32(dv.getUint16(o + 2, true));
        for (let j = 0; j < 16; j++) {
          const q = bytes[o + 4 + j];
          out[y + j] = fr((q & 15) * d) + m;
          out[y + j + 16] = fr((q >> 4) * d) + m;
        }
        break;
      }
      case 'Q5_0': {
        const qh = dv.getUint32(o + 2, true);
        for (let j = 0; j < 16; j++) {
          const q = bytes[o + 6 + j];
          out[y + j] = (((q & 15) | (((qh >>> j) & 1) << 4)) - 16) * d;
          out[y + j + 16] = (((q >> 4) | (((qh >>> (j + 16)) & 1) << 4)) - 16) * d;
        }
        break;
      }
      case 'Q5_1': {
        const m = f16BitsToF32(dv.getUint16(o + 2, true));
        const qh = dv.getUint32(o + 4, true);
        for (let j = 0; j < 16; j++) {
          const q = bytes[o + 8 + j];
          out[y + j] = fr(((q & 15) | (((qh >>> j) & 1) << 4)) * d) + m;
          out[y + j + 16] = fr(((q >> 4) | (((qh >>> (j + 16)) & 1) << 4)) * d) + m;
        }
        break;
      }
      case 'Q8_0':
        for (let j = 0; j < 32; j++) out[y + j] = dv.getInt8(o + 2 + j) * d;
        break;
      default:
        throw new QaloraError(`${where}: no dequantizer for ${info.name}`);
    }
  }
  return out;
}
