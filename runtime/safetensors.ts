// safetensors: u64 LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, __metadata__?}, then
// the byte buffer. Reading validates everything a later typed view relies on, so a bad file fails here, naming
// the file and the tensor, instead of producing a garbage model. openSafetensors reads the header alone and each
// tensor when asked (files of any size, sharded or not); readSafetensors reads every tensor (small files).
import { QaloraError } from './errors.ts';
import { BufferSource, type ByteSource, withFile, writeFileAtomic } from './formats/file.ts';

export { writeFileAtomic };

export type SafeDType = 'F32' | 'F16' | 'BF16' | 'I32' | 'U8' | 'I8' | 'I64' | 'F64' | 'I16' | 'U16' | 'U32';

export const DTYPE_BYTES: Record<SafeDType, number> = {
  F32: 4, F16: 2, BF16: 2, I32: 4, U8: 1, I8: 1, I64: 8, F64: 8, I16: 2, U16: 2, U32: 4,
};

export interface SafeTensor {
  dtype: SafeDType;
  shape: number[];
  /** Raw little-endian bytes (a view into the buffer parseSafetensors was given, or the tensor's own array). */
  data: Uint8Array;
}

/** A tensor whose bytes are obtained when needed: read() on every call (no cache). Writers take these too. */
export interface LazyTensor {
  dtype: SafeDType;
  shape: number[];
  read(): Uint8Array;
}

/** A tensor of an opened file. */
export interface StoredTensor extends LazyTensor {
  name: string;
  /** The file it is in (a shard's path for sharded checkpoints). */
  file: string;
  /** Absolute offset of its first byte in the file, and its size. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsFile {
  tensors: Map<string, SafeTensor>;
  metadata: Record<string, string>;
}

/** An opened file: the header is read, tensors are read when asked. */
export interface SafetensorsIndex {
  path: string;
  tensors: Map<string, StoredTensor>;
  metadata: Record<string, string>;
  /** Releases the file (its tensors can no longer be read). */
  close(): void;
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** A stored tensor's bytes as a SafeTensor (its own array, aligned: typed views need no copy). */
export function readTensor(t: LazyTensor): SafeTensor {
  return { dtype: t.dtype, shape: t.shape, data: t.read() };
}

/** Opens a .safetensors file: reads the header now, each tensor when its read() is called. */
export function openSafetensors(path: string): SafetensorsIndex {
  return withFile(path, 'safetensors file', (src) => parseHeader(src));
}

/** Reads a whole .safetensors file, every tensor in its own array (for small files: adapters, checkpoints). */
export function readSafetensors(path: string): SafetensorsFile {
  const f = openSafetensors(path);
  try {
    return { tensors: new Map([...f.tensors].map(([name, t]) => [name, readTensor(t)])), metadata: f.metadata };
  } finally {
    f.close();
  }
}

/** A safetensors file in memory; tensors are views into `bytes`. */
export function parseSafetensors(bytes: Uint8Array, path = '<buffer>'): SafetensorsFile {
  const f = parseHeader(new BufferSource(bytes, path));
  return { tensors: new Map([...f.tensors].map(([name, t]) => [name, readTensor(t)])), metadata: f.metadata };
}

/** Headers beyond this are not safetensors files (real ones are kilobytes to a few MB); refuse before reading. */
const MAX_HEADER = 256 << 20;

function parseHeader(src: ByteSource): SafetensorsIndex {
  const path = src.path;
  if (src.size < 8) throw new QaloraError(`${path}: not a safetensors file (${src.size} bytes, need an 8-byte header length)`);
  const len = src.bytes(0, 8, `${path}: header length`);
  const headerLen = new DataView(len.buffer, len.byteOffset, 8).getBigUint64(0, true);
  if (headerLen > BigInt(src.size - 8)) {
    throw new QaloraError(`${path}: safetensors header length ${headerLen} exceeds the file size ${src.size} (truncated or not a safetensors file)`);
  }
  const hl = Number(headerLen);
  if (hl > MAX_HEADER) throw new QaloraError(`${path}: safetensors header length ${hl} is implausible (over ${MAX_HEADER} bytes; not a safetensors file?)`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(src.bytes(8, hl, `${path}: header`)));
  } catch (e) {
    throw new QaloraError(`${path}: safetensors header is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new QaloraError(`${path}: safetensors header must be a JSON object`);
  }
  const dataStart = 8 + hl;
  const dataLen = src.size - dataStart;
  const tensors = new Map<string, StoredTensor>();
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (raw === null || typeof raw !== 'object') throw new QaloraError(`${path}: __metadata__ must be an object of strings`);
      metadata = Object.fromEntries(Object.entries(raw as Record<string, unknown>).map(([k, v]) => [k, String(v)]));
      continue;
    }
    const info = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    const where = `${path}: tensor '${name}'`;
    if (typeof info?.dtype !== 'string' || !(info.dtype in DTYPE_BYTES)) {
      throw new QaloraError(`${where}: unsupported dtype ${JSON.stringify(info?.dtype)} (supported: ${Object.keys(DTYPE_BYTES).join(', ')})`);
    }
    const dtype = info.dtype as SafeDType;
    // Safe integers only: JSON numbers past 2^53 have already lost their exact value.
    if (!Array.isArray(info.shape) || !info.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new QaloraError(`${where}: shape must be an array of non-negative integers, got ${JSON.stringify(info.shape)}`);
    }
    const off = info.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0) || off[0] > off[1]) {
      throw new QaloraError(`${where}: data_offsets must be [begin, end] with 0 ≤ begin ≤ end < 2^53, got ${JSON.stringify(off)}`);
    }
    const [begin, end] = off as [number, number];
    if (end > dataLen) {
      throw new QaloraError(`${where}: data_offsets [${begin}, ${end}] run past the data buffer (${dataLen} bytes; file truncated?)`);
    }
    const shape = info.shape as number[];
    const expected = numel(shape) * DTYPE_BYTES[dtype];
    if (!Number.isSafeInteger(expected)) throw new QaloraError(`${where}: shape [${shape}] of ${dtype} overflows (more than 2^53 bytes; lying header?)`);
    if (end - begin !== expected) {
      throw new QaloraError(`${where}: ${end - begin} bytes of data but shape [${shape}] of ${dtype} needs ${expected}`);
    }
    const offset = dataStart + begin, what = `${where}: ${dtype} [${shape}]`;
    tensors.set(name, { name, file: path, dtype, shape, offset, byteLength: expected, read: () => src.bytes(offset, expected, what) });
  }
  return { path, tensors, metadata, close: () => src.close() };
}

/** A typed array over the tensor's bytes, copying only when the bytes are not aligned for the type. */
function view<T>(t: SafeTensor, size: number, Ctor: new (b: ArrayBuffer, o: number, n: number) => T): T {
  const n = t.data.byteLength / size;
  if (t.data.byteOffset % size === 0) return new Ctor(t.data.buffer as ArrayBuffer, t.data.byteOffset, n);
  return new Ctor(t.data.slice().buffer as ArrayBuffer, 0, n);
}

const f16Table = (() => {
  // All 65536 fp16 values, so F16 → F32 is a table lookup (same rule as qalora_common.h f16_to_f32).
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) t[h] = f16BitsToF32(h);
  return t;
})();

export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

export function f16ToF32Array(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = f16Table[bits[i]];
  return out;
}

export function bf16ToF32Array(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return out;
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** Round to nearest even, as qalora_common.h f32_to_f16. */
export function f32ToF16Bits(f: number): number {
  f32Scratch[0] = f;
  const u = u32Scratch[0];
  const sign = (u >>> 16) & 0x8000;
  const a = u & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00;
  if (a >= 0x477ff000) return sign | 0x7c00;
  if (a < 0x38800000) {
    if (a < 0x33000000) return sign;
    const shift = 126 - (a >>> 23);
    const man = (a & 0x7fffff) | 0x800000;
    let r = man >>> shift;
    const rem = man & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  const r = (a + 0x0fff + ((a >>> 13) & 1) - (112 << 23)) >>> 0;
  return sign | (r >>> 13);
}

export function f32ToBf16Bits(f: number): number {
  f32Scratch[0] = f;
  let u = u32Scratch[0];
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  u = (u + 0x7fff + ((u >>> 16) & 1)) >>> 0;
  return u >>> 16;
}

/** The tensor as F32 (F32 viewed in place when aligned; F16, BF16, F64 and integer types converted). */
export function asF32(t: SafeTensor): Float32Array {
  switch (t.dtype) {
    case 'F32': return view(t, 4, Float32Array);
    case 'F16': return f16ToF32Array(view(t, 2, Uint16Array));
    case 'BF16': return bf16ToF32Array(view(t, 2, Uint16Array));
    case 'F64': return Float32Array.from(view(t, 8, Float64Array));
    case 'I32': return Float32Array.from(view(t, 4, Int32Array));
    case 'I16': return Float32Array.from(view(t, 2, Int16Array));
    case 'U16': return Float32Array.from(view(t, 2, Uint16Array));
    case 'U32': return Float32Array.from(view(t, 4, Uint32Array));
    case 'I8': return Float32Array.from(new Int8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    case 'U8': return Float32Array.from(t.data);
    case 'I64': return Float32Array.from(view(t, 8, BigInt64Array), (v) => Number(v));
  }
}

export function asI32(t: SafeTensor): Int32Array {
  if (t.dtype === 'I32') return view(t, 4, Int32Array);
  if (t.dtype === 'I64') return Int32Array.from(view(t, 8, BigInt64Array), (v) => Number(v));
  if (t.dtype === 'U32') return new Int32Array(view(t, 4, Uint32Array).slice().buffer);
  throw new QaloraError(`tensor of dtype ${t.dtype} cannot be read as I32`);
}

export function asU16(t: SafeTensor): Uint16Array {
  if (t.dtype !== 'F16' && t.dtype !== 'BF16' && t.dtype !== 'U16' && t.dtype !== 'I16') {
    throw new QaloraError(`tensor of dtype ${t.dtype} has no 16-bit view`);
  }
  return view(t, 2, Uint16Array);
}

/** Builds a tensor from a typed array (the bytes are shared, not copied). */
export function tensorOf(dtype: SafeDType, shape: number[], data: ArrayBufferView): SafeTensor {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const expected = numel(shape) * DTYPE_BYTES[dtype];
  if (bytes.byteLength !== expected) {
    throw new QaloraError(`tensor of shape [${shape}] ${dtype} needs ${expected} bytes, got ${bytes.byteLength}`);
  }
  return { dtype, shape: [...shape], data: bytes };
}

/** F32 data stored as F16 or BF16 (rounded to nearest even). */
export function f32To16(dtype: 'F16' | 'BF16', shape: number[], data: Float32Array): SafeTensor {
  const conv = dtype === 'F16' ? f32ToF16Bits : f32ToBf16Bits;
  const out = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = conv(data[i]);
  return tensorOf(dtype, shape, out);
}

/** The header (length + JSON, padded so the data starts 8-aligned) for tensors in this order. */
function safetensorsHeader(entries: [string, { dtype: SafeDType; shape: number[] }][], metadata: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of entries) {
    const bytes = numel(t.shape) * DTYPE_BYTES[t.dtype];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces so the data buffer starts 8-aligned and typed views need no copy.
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const head = new Uint8Array(8 + Buffer.byteLength(json));
  new DataView(head.buffer).setBigUint64(0, BigInt(head.byteLength - 8), true);
  Buffer.from(head.buffer).write(json, 8, 'utf8');
  return head;
}

function checkedBytes(name: string, t: SafeTensor | LazyTensor, data: Uint8Array): Uint8Array {
  const expected = numel(t.shape) * DTYPE_BYTES[t.dtype];
  if (data.byteLength !== expected) {
    throw new QaloraError(`tensor '${name}': ${data.byteLength} bytes but shape [${t.shape}] of ${t.dtype} needs ${expected}`);
  }
  return data;
}

/** Serialises tensors (in the map's order) and metadata into the safetensors byte layout. */
export function serializeSafetensors(tensors: Map<string, SafeTensor> | Record<string, SafeTensor>, metadata: Record<string, string> = {}): Uint8Array[] {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  const data = entries.map(([name, t]) => checkedBytes(name, t, t.data));
  return [safetensorsHeader(entries, metadata), ...data];
}

/**
 * Writes atomically: a temporary file beside the target, fsynced, then renamed over it. Tensors given as
 * LazyTensor (a StoredTensor of an opened file, or one computed on demand) are read one at a time as the
 * writer reaches them, so a big file is written at the memory of its largest tensor.
 */
export function writeSafetensors(path: string, tensors: Map<string, SafeTensor | LazyTensor> | Record<string, SafeTensor | LazyTensor>, metadata: Record<string, string> = {}): void {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  for (const [name, t] of entries) if ('data' in t) checkedBytes(name, t, t.data);
  writeFileAtomic(path, (function* () {
    yield safetensorsHeader(entries, metadata);
    for (const [name, t] of entries) yield checkedBytes(name, t, 'data' in t ? t.data : t.read());
  })());
}
