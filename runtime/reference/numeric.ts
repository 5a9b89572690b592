// Bit-level helpers the reference shares with templates/common/qalora_common.h: the packed layout 'blocked32',
// the dropout hash (splitmix64 in BigInt, so it is exact) and fp16/bf16 round-to-nearest-even storage.
// Each function mirrors its C++ namesake line by line; if one changes, the other must.

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32Bits(x: number): number {
  f32[0] = x;
  return u32[0];
}
export function bitsToF32(u: number): number {
  u32[0] = u >>> 0;
  return f32[0];
}

export function wordsPerRow(inFeatures: number, bits: number): number {
  return Math.ceil(inFeatures / 32) * bits;
}

/** q of input i in a packed row (the row's words start at `offset` of `words`). */
export function unpackQ(words: Uint32Array, offset: number, i: number, bits: number): number {
  const blk = offset + Math.floor(i / 32) * bits;
  const j = i % 32;
  if (bits === 3) {
    const lo = (words[blk + (j >> 4)] >>> ((j & 15) * 2)) & 3;
    const hi = (words[blk + 2] >>> j) & 1;
    return lo | (hi << 2);
  }
  const per = 32 / bits;
  return (words[blk + Math.floor(j / per)] >>> ((j % per) * bits)) & ((1 << bits) - 1);
}

/** ORs q into a row that the caller zeroed first. */
export function packQ(words: Uint32Array, offset: number, i: number, bits: number, q: number): void {
  const blk = offset + Math.floor(i / 32) * bits;
  const j = i % 32;
  if (bits === 3) {
    words[blk + (j >> 4)] |= (q & 3) << ((j & 15) * 2);
    words[blk + 2] |= ((q >> 2) & 1) << j;
    return;
  }
  const per = 32 / bits;
  words[blk + Math.floor(j / per)] |= (q & ((1 << bits) - 1)) << ((j % per) * bits);
}

const MASK64 = (1n << 64n) - 1n;
export function splitmix64(z: bigint): bigint {
  z = (z + 0x9e3779b97f4a7c15n) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

/** Whether element `index` of the tensor dropout applies to survives (probability p of dropping). */
export function dropoutKeep(seed: number | bigint, index: number, p: number): boolean {
  const u = splitmix64((BigInt(seed) & MASK64) ^ splitmix64(BigInt(index)));
  // (u >> 40) has 24 bits, so the fp32 product with 2^-24 is exact; compare against p rounded to fp32.
  return Number(u >> 40n) / 16777216 >= Math.fround(p);
}

/** Round half to even, as rintf under the default rounding mode. */
export function rintEven(v: number): number {
  const r = Math.round(v);
  return Math.abs(v - Math.trunc(v)) === 0.5 ? 2 * Math.round(v / 2) : r;
}

export function bf16ToF32(h: number): number {
  return bitsToF32((h & 0xffff) << 16);
}
export function f32ToBf16(x: number): number {
  let u = f32Bits(x);
  if ((u & 0x7fffffff) >>> 0 > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  u = (u + 0x7fff + ((u >>> 16) & 1)) >>> 0;
  return u >>> 16;
}

export function f16ToF32(h: number): number {
  const sign = (h & 0x8000) << 16;
  let exp = (h >> 10) & 0x1f;
  let man = h & 0x3ff;
  let u: number;
  if (exp === 0) {
    if (man === 0) u = sign;
    else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        exp--;
      }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp === 31) u = sign | 0x7f800000 | (man << 13);
  else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  return bitsToF32(u >>> 0);
}
export function f32ToF16(x: number): number {
  const u = f32Bits(x);
  const sign = (u >>> 16) & 0x8000;
  const a = (u & 0x7fffffff) >>> 0;
  if (a > 0x7f800000) return sign | 0x7e00;
  if (a >= 0x477ff000) return sign | 0x7c00;
  if (a < 0x38800000) {
    if (a < 0x33000000) return sign;
    const shift = 126 - (a >>> 23);
    const man = (a & 0x7fffff) | 0x800000;
    let r = Math.floor(man / 2 ** shift);
    const rem = man - r * 2 ** shift;
    const half = 2 ** (shift - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  const r = a + 0x0fff + ((a >>> 13) & 1) - (112 << 23);
  return sign | Math.floor(r / 8192);
}

export type ActDType = 'fp32' | 'fp16' | 'bf16';

/** Activations as numbers: fp32 values, or fp16/bf16 raw bits decoded. */
export function decodeAct(data: Float32Array | Uint16Array, dtype: ActDType): Float64Array {
  const out = new Float64Array(data.length);
  for (let i = 0; i < data.length; i++) {
    out[i] = dtype === 'fp32' ? data[i] : dtype === 'fp16' ? f16ToF32(data[i]) : bf16ToF32(data[i]);
  }
  return out;
}

/** Numbers stored in the activation dtype (round to nearest even). */
export function encodeAct(values: ArrayLike<number>, dtype: ActDType): Float32Array | Uint16Array {
  if (dtype === 'fp32') return Float32Array.from(values as ArrayLike<number>);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = dtype === 'fp16' ? f32ToF16(values[i]) : f32ToBf16(values[i]);
  return out;
}
