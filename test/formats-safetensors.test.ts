import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import {
  asF32, asI32, f16BitsToF32, f32To16, f32ToBf16Bits, f32ToF16Bits, readSafetensors, tensorOf, writeSafetensors,
} from '../runtime/safetensors.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-st-'));

/** Builds a safetensors file by hand (independently of the writer): header JSON then the raw buffer. */
function handMade(header: object, data: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, data]);
}

describe('safetensors', () => {
  it('reads a hand-built file of every dtype, with unaligned data and metadata', () => {
    const f32 = Buffer.alloc(8); f32.writeFloatLE(1.5, 0); f32.writeFloatLE(-2.25, 4);
    const f16 = Buffer.from([0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00]); // 1, -2, smallest subnormal
    const bf16 = Buffer.from([0xc0, 0x3f, 0x80, 0xbf]); // 1.5, -1
    const i32 = Buffer.alloc(8); i32.writeInt32LE(-7, 0); i32.writeInt32LE(123456, 4);
    const i64 = Buffer.alloc(8); i64.writeBigInt64LE(-3n);
    const f64 = Buffer.alloc(8); f64.writeDoubleLE(0.1);
    const u8 = Buffer.from([0, 255, 7]);
    const i8 = Buffer.from([0x80, 0x7f]);
    const parts = [u8, f32, f16, bf16, i32, i64, f64, i8]; // u8 first: everything after it is unaligned
    const names = ['u8', 'f32', 'f16', 'bf16', 'i32', 'i64', 'f64', 'i8'];
    const dtypes = ['U8', 'F32', 'F16', 'BF16', 'I32', 'I64', 'F64', 'I8'];
    const shapes = [[3], [2, 1], [3], [2], [2], [1], [1], [2]];
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
    let off = 0;
    parts.forEach((p, i) => {
      header[names[i]] = { dtype: dtypes[i], shape: shapes[i], data_offsets: [off, off + p.length] };
      off += p.length;
    });
    const path = join(dir, 'hand.safetensors');
    writeFileSync(path, handMade(header, Buffer.concat(parts)));
    const st = readSafetensors(path);
    expect(st.metadata).toEqual({ format: 'pt' });
    const get = (n: string) => st.tensors.get(n)!;
    expect(get('f32').shape).toEqual([2, 1]);
    expect([...asF32(get('f32'))]).toEqual([1.5, -2.25]);
    expect([...asF32(get('f16'))]).toEqual([1, -2, 2 ** -24]);
    expect([...asF32(get('bf16'))]).toEqual([1.5, -1]);
    expect([...asI32(get('i32'))]).toEqual([-7, 123456]);
    expect([...asI32(get('i64'))]).toEqual([-3]);
    expect(asF32(get('f64'))[0]).toBe(Math.fround(0.1));
    expect([...asF32(get('u8'))]).toEqual([0, 255, 7]);
    expect([...asF32(get('i8'))]).toEqual([-128, 127]);
  });

  it('round-trips through the writer, aligned, atomically, in order', () => {
    const w = Float32Array.from({ length: 12 }, (_, i) => Math.sin(i) * 10);
    const path = join(dir, 'rt.safetensors');
    writeSafetensors(path, {
      'a.weight': tensorOf('F32', [3, 4], w),
      'a.half': f32To16('F16', [3, 4], w),
      'a.bf': f32To16('BF16', [12], w),
      'ids': tensorOf('I32', [2], Int32Array.from([5, -6])),
      'bytes': tensorOf('U8', [1], Uint8Array.from([9])),
    }, { note: 'x' });
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
    const raw = readFileSync(path);
    expect((8 + Number(raw.readBigUInt64LE(0))) % 8).toBe(0);
    const st = readSafetensors(path);
    expect([...st.tensors.keys()]).toEqual(['a.weight', 'a.half', 'a.bf', 'ids', 'bytes']);
    expect(asF32(st.tensors.get('a.weight')!)).toEqual(w);
    // fp16 / bf16: each value equals the reference rounding of the input.
    const half = asF32(st.tensors.get('a.half')!);
    const bf = asF32(st.tensors.get('a.bf')!);
    for (let i = 0; i < w.length; i++) {
      expect(half[i]).toBe(f16BitsToF32(f32ToF16Bits(w[i])));
      expect(Math.abs(half[i] - w[i])).toBeLessThanOrEqual(Math.abs(w[i]) * 2 ** -11);
      expect(Math.abs(bf[i] - w[i])).toBeLessThanOrEqual(Math.abs(w[i]) * 2 ** -8);
    }
    expect([...asI32(st.tensors.get('ids')!)]).toEqual([5, -6]);
    expect(st.metadata).toEqual({ note: 'x' });
  });

  it('rounds fp16 and bf16 to nearest even like the native header', () => {
    // 1 + 2^-11 is exactly half way between two fp16 values: ties to the even one (1.0).
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00);
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(f32ToF16Bits(65520)).toBe(0x7c00);
    expect(f32ToF16Bits(2 ** -25)).toBe(0); // exactly half the smallest subnormal: ties to even zero
    expect(f32ToF16Bits(3 * 2 ** -26)).toBe(1);
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80);
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82);
    // every fp16 value survives f16 → f32 → f16
    const mismatches: number[] = [];
    for (let h = 0; h < 65536; h++) {
      const e = (h >> 10) & 31;
      if (e === 31 && (h & 0x3ff)) continue; // NaNs canonicalise
      if (f32ToF16Bits(f16BitsToF32(h)) !== h) mismatches.push(h);
    }
    expect(mismatches).toEqual([]);
  });

  const bad = (name: string, bytes: Buffer) => {
    const p = join(dir, name);
    writeFileSync(p, bytes);
    return p;
  };
  const errorOf = (p: string) => {
    try { readSafetensors(p); } catch (e) { expect(e).toBeInstanceOf(QaloraError); return (e as Error).message; }
    throw new Error('no error');
  };

  it('names the file and tensor for bad headers', () => {
    const data = Buffer.alloc(8);
    expect(errorOf(bad('short.safetensors', Buffer.from([1, 2])))).toMatch(/short\.safetensors.*8-byte/);
    const trunc = handMade({ t: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, data).subarray(0, 20);
    expect(errorOf(bad('trunc.safetensors', trunc))).toMatch(/trunc\.safetensors.*exceeds the file size/);
    const past = handMade({ t: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, data);
    expect(errorOf(bad('past.safetensors', past))).toMatch(/past\.safetensors: tensor 't'.*run past/);
    const size = handMade({ w: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, data);
    expect(errorOf(bad('size.safetensors', size))).toMatch(/tensor 'w': 8 bytes .* needs 12/);
    const dt = handMade({ w: { dtype: 'F8_E4M3', shape: [8], data_offsets: [0, 8] } }, data);
    expect(errorOf(bad('dt.safetensors', dt))).toMatch(/tensor 'w': unsupported dtype "F8_E4M3"/);
    const json = Buffer.concat([Buffer.from([3, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{x:')]);
    expect(errorOf(bad('json.safetensors', json))).toMatch(/json\.safetensors.*not valid UTF-8 JSON/);
    expect(errorOf(join(dir, 'missing.safetensors'))).toMatch(/missing\.safetensors: cannot read/);
  });
});
