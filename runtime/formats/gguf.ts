// GGUF v1 (u32 counts, string lengths and dims), v2 and v3 (u64): header, metadata KVs, tensor infos, aligned
// data. Tensors keep their raw bytes (quantized blocks stay accessible); dequantize on demand.
import { readFileSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import { dequantize, ggmlBytes, GgmlType, ggmlTypeName } from './ggml-types.ts';

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as u32 LE

export const GgufValueType = {
  U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STRING: 8, ARRAY: 9, U64: 10, I64: 11, F64: 12,
} as const;

export type GgufArray = Uint8Array | Int8Array | Uint16Array | Int16Array | Uint32Array | Int32Array | Float32Array
  | Float64Array | BigUint64Array | BigInt64Array | boolean[] | string[] | GgufArray[];
export type GgufScalar = number | bigint | boolean | string;
export type GgufValue = GgufScalar | GgufArray;

export interface GgufKV {
  type: number;
  /** Element type for arrays. */
  elemType?: number;
  value: GgufValue;
}

export interface GgufTensor {
  name: string;
  /** dims[0] is the contiguous one: a [out, in] weight has dims [in, out]. */
  dims: number[];
  type: number;
  /** Offset relative to the data section. */
  offset: number;
  /** Raw bytes (blocks as stored). */
  data: Uint8Array;
}

export interface GgufFile {
  path: string;
  version: number;
  alignment: number;
  metadata: Map<string, GgufKV>;
  tensors: Map<string, GgufTensor>;
}

class Reader {
  private readonly dv: DataView;
  o = 0;
  constructor(private readonly buf: Uint8Array, private readonly path: string, private readonly wide: boolean) {
    this.dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  need(n: number, what: string): void {
    if (this.o + n > this.buf.byteLength) {
      throw new QaloraError(`${this.path}: truncated GGUF while reading ${what} (needs ${n} bytes at offset ${this.o}, file has ${this.buf.byteLength})`);
    }
  }
  u32(what: string): number { this.need(4, what); const v = this.dv.getUint32(this.o, true); this.o += 4; return v; }
  u64(what: string): number {
    this.need(8, what);
    const v = this.dv.getBigUint64(this.o, true);
    this.o += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new QaloraError(`${this.path}: ${what} = ${v} is out of range`);
    return Number(v);
  }
  /** A count or length: u32 in v1, u64 from v2. */
  count(what: string): number { return this.wide ? this.u64(what) : this.u32(what); }
  str(what: string): string {
    const n = this.count(`${what} length`);
    this.need(n, what);
    const s = Buffer.from(this.buf.buffer, this.buf.byteOffset + this.o, n).toString('utf8');
    this.o += n;
    return s;
  }
  scalar(type: number, what: string): GgufScalar {
    const dv = this.dv;
    const size = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8][type];
    if (type === GgufValueType.STRING) return this.str(what);
    if (size === undefined || size === 0) throw new QaloraError(`${this.path}: ${what} has unknown GGUF value type ${type}`);
    this.need(size, what);
    const o = this.o;
    this.o += size;
    switch (type) {
      case 0: return dv.getUint8(o);
      case 1: return dv.getInt8(o);
      case 2: return dv.getUint16(o, true);
      case 3: return dv.getInt16(o, true);
      case 4: return dv.getUint32(o, true);
      case 5: return dv.getInt32(o, true);
      case 6: return dv.getFloat32(o, true);
      case 7: return dv.getUint8(o) !== 0;
      case 10: return dv.getBigUint64(o, true);
      case 11: return dv.getBigInt64(o, true);
      default: return dv.getFloat64(o, true);
    }
  }
  array(what: string): { elemType: number; value: GgufArray } {
    const elemType = this.u32(`${what} element type`);
    const n = this.count(`${what} count`);
    const typed: Record<number, [new (n: number) => ArrayLike<unknown> & { [i: number]: unknown }, number]> = {
      0: [Uint8Array, 1], 1: [Int8Array, 1], 2: [Uint16Array, 2], 3: [Int16Array, 2], 4: [Uint32Array, 4],
      5: [Int32Array, 4], 6: [Float32Array, 4], 10: [BigUint64Array, 8], 11: [BigInt64Array, 8], 12: [Float64Array, 8],
    };
    const t = typed[elemType];
    if (t) {
      this.need(n * t[1], what);
      const out = new t[0](n);
      new Uint8Array((out as unknown as Uint8Array).buffer).set(this.buf.subarray(this.o, this.o + n * t[1]));
      this.o += n * t[1];
      return { elemType, value: out as unknown as GgufArray };
    }
    if (elemType === GgufValueType.BOOL) {
      this.need(n, what);
      const out = Array.from(this.buf.subarray(this.o, this.o + n), (b) => b !== 0);
      this.o += n;
      return { elemType, value: out };
    }
    if (elemType === GgufValueType.STRING) {
      const out: string[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = this.str(`${what}[${i}]`);
      return { elemType, value: out };
    }
    if (elemType === GgufValueType.ARRAY) {
      const out: GgufArray[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = this.array(`${what}[${i}]`).value;
      return { elemType, value: out };
    }
    throw new QaloraError(`${this.path}: ${what} has unknown GGUF array element type ${elemType}`);
  }
}

export function readGguf(path: string): GgufFile {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new QaloraError(`${path}: cannot read GGUF file (${(e as Error).message})`);
  }
  return parseGguf(new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength), path);
}

export function parseGguf(buf: Uint8Array, path = '<buffer>'): GgufFile {
  if (buf.byteLength < 8 || new DataView(buf.buffer, buf.byteOffset).getUint32(0, true) !== GGUF_MAGIC) {
    throw new QaloraError(`${path}: not a GGUF file (missing "GGUF" magic)`);
  }
  const version = new DataView(buf.buffer, buf.byteOffset).getUint32(4, true);
  if (version < 1 || version > 3) throw new QaloraError(`${path}: GGUF version ${version} is not supported (1, 2, 3)`);
  const r = new Reader(buf, path, version >= 2);
  r.o = 8;
  const nTensors = r.count('tensor count');
  const nKv = r.count('metadata count');
  const metadata = new Map<string, GgufKV>();
  for (let i = 0; i < nKv; i++) {
    const key = r.str(`metadata key #${i}`);
    const type = r.u32(`type of metadata '${key}'`);
    if (type === GgufValueType.ARRAY) {
      const { elemType, value } = r.array(`metadata '${key}'`);
      metadata.set(key, { type, elemType, value });
    } else {
      metadata.set(key, { type, value: r.scalar(type, `metadata '${key}'`) });
    }
  }
  const alignKv = metadata.get('general.alignment');
  const alignment = alignKv === undefined ? 32 : Number(alignKv.value);
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new QaloraError(`${path}: general.alignment ${alignKv?.value} must be a power of two`);
  }
  const infos: Omit<GgufTensor, 'data'>[] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = r.str(`tensor #${i} name`);
    const nDims = r.u32(`tensor '${name}' n_dims`);
    if (nDims < 1 || nDims > 4) throw new QaloraError(`${path}: tensor '${name}' has ${nDims} dimensions (1 to 4 allowed)`);
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(r.count(`tensor '${name}' dims`));
    const type = r.u32(`tensor '${name}' type`);
    const offset = r.u64(`tensor '${name}' offset`);
    infos.push({ name, dims, type, offset });
  }
  const dataStart = Math.ceil(r.o / alignment) * alignment;
  const tensors = new Map<string, GgufTensor>();
  for (const t of infos) {
    const where = `${path}: tensor '${t.name}'`;
    const elems = t.dims.reduce((a, b) => a * b, 1);
    let bytes: number;
    try {
      bytes = ggmlBytes(t.type, t.dims[0], elems, where);
    } catch (e) {
      // Keep unreadable tensors listed (metadata-only uses work); reading their values reports the type.
      if (!(e instanceof QaloraError)) throw e;
      bytes = 0;
    }
    if (t.offset % alignment !== 0) throw new QaloraError(`${where}: offset ${t.offset} is not a multiple of the alignment ${alignment}`);
    const begin = dataStart + t.offset;
    if (begin + bytes > buf.byteLength) {
      throw new QaloraError(`${where}: ${ggmlTypeName(t.type)} [${t.dims}] needs ${bytes} bytes at offset ${begin}, file has ${buf.byteLength} (truncated?)`);
    }
    tensors.set(t.name, { ...t, data: buf.subarray(begin, begin + bytes) });
  }
  return { path, version, alignment, metadata, tensors };
}

/** A metadata value, or a QaloraError naming the key when it is missing (and no default is given). */
export function ggufGet<T extends GgufValue>(f: GgufFile, key: string, fallback?: T): T {
  const kv = f.metadata.get(key);
  if (kv === undefined) {
    if (fallback !== undefined) return fallback;
    throw new QaloraError(`${f.path}: missing GGUF metadata '${key}'`);
  }
  return kv.value as T;
}

export function ggufNumber(f: GgufFile, key: string, fallback?: number): number {
  const v = ggufGet<GgufValue>(f, key, fallback);
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  throw new QaloraError(`${f.path}: GGUF metadata '${key}' should be a number, is ${typeof v}`);
}

/** A tensor's values as F32, checking it has the expected dims (dims[0] contiguous). */
export function ggufTensorF32(f: GgufFile, name: string, dims?: number[]): Float32Array {
  const t = f.tensors.get(name);
  if (!t) throw new QaloraError(`${f.path}: missing tensor '${name}'${dims ? ` (expected dims [${dims}])` : ''}`);
  if (dims && (t.dims.length !== dims.length || t.dims.some((d, i) => d !== dims[i]))) {
    throw new QaloraError(`${f.path}: tensor '${name}' has dims [${t.dims}], expected [${dims}]`);
  }
  const elems = t.dims.reduce((a, b) => a * b, 1);
  return dequantize(t.type, t.data, elems, `${f.path}: tensor '${name}'`);
}

// ---- Writing (tests, export) ----------------------------------------------------------------------------

export interface GgufWriteTensor {
  name: string;
  dims: number[];
  type: number;
  data: Uint8Array;
}

/** A metadata entry to write: the value's GGUF type is given explicitly (no guessing between u32/i32/f32). */
export type GgufWriteKV = [key: string, type: number, value: GgufValue, elemType?: number];

class Writer {
  chunks: Uint8Array[] = [];
  length = 0;
  constructor(private readonly wide: boolean) {}
  bytes(b: Uint8Array): void { this.chunks.push(b); this.length += b.byteLength; }
  num(size: number, set: (dv: DataView) => void): void { const b = new Uint8Array(size); set(new DataView(b.buffer)); this.bytes(b); }
  u32(v: number): void { this.num(4, (d) => d.setUint32(0, v, true)); }
  u64(v: number | bigint): void { this.num(8, (d) => d.setBigUint64(0, BigInt(v), true)); }
  count(v: number): void { if (this.wide) this.u64(v); else this.u32(v); }
  str(s: string): void { const b = Buffer.from(s, 'utf8'); this.count(b.length); this.bytes(b); }
  scalar(type: number, v: GgufValue): void {
    switch (type) {
      case 0: return this.num(1, (d) => d.setUint8(0, Number(v)));
      case 1: return this.num(1, (d) => d.setInt8(0, Number(v)));
      case 2: return this.num(2, (d) => d.setUint16(0, Number(v), true));
      case 3: return this.num(2, (d) => d.setInt16(0, Number(v), true));
      case 4: return this.num(4, (d) => d.setUint32(0, Number(v), true));
      case 5: return this.num(4, (d) => d.setInt32(0, Number(v), true));
      case 6: return this.num(4, (d) => d.setFloat32(0, Number(v), true));
      case 7: return this.num(1, (d) => d.setUint8(0, v ? 1 : 0));
      case 8: return this.str(String(v));
      case 10: return this.num(8, (d) => d.setBigUint64(0, BigInt(v as number), true));
      case 11: return this.num(8, (d) => d.setBigInt64(0, BigInt(v as number), true));
      case 12: return this.num(8, (d) => d.setFloat64(0, Number(v), true));
      default: throw new Error(`cannot write GGUF value type ${type}`);
    }
  }
  array(elemType: number, values: ArrayLike<unknown>): void {
    this.u32(elemType);
    this.count(values.length);
    for (let i = 0; i < values.length; i++) this.scalar(elemType, values[i] as GgufValue);
  }
}

/** Serialises a GGUF file (v1 with u32 counts, v2/v3 with u64), tensors aligned to `alignment`. */
export function serializeGguf(kvs: GgufWriteKV[], tensors: GgufWriteTensor[], version = 3, alignment = 32): Uint8Array[] {
  const w = new Writer(version >= 2);
  w.u32(GGUF_MAGIC);
  w.u32(version);
  w.count(tensors.length);
  w.count(kvs.length);
  for (const [key, type, value, elemType] of kvs) {
    w.str(key);
    w.u32(type);
    if (type === GgufValueType.ARRAY) w.array(elemType ?? GgufValueType.F32, value as ArrayLike<unknown>);
    else w.scalar(type, value);
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    const elems = t.dims.reduce((a, b) => a * b, 1);
    const bytes = ggmlBytes(t.type, t.dims[0], elems, `tensor '${t.name}'`);
    if (bytes !== t.data.byteLength) throw new QaloraError(`tensor '${t.name}': ${t.data.byteLength} bytes, ${ggmlTypeName(t.type)} [${t.dims}] needs ${bytes}`);
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.count(d);
    w.u32(t.type);
    w.u64(offset);
    offsets.push(offset);
    offset = Math.ceil((offset + bytes) / alignment) * alignment;
  }
  const pad = (n: number) => { if (n > 0) w.bytes(new Uint8Array(n)); };
  pad(Math.ceil(w.length / alignment) * alignment - w.length);
  const dataStart = w.length;
  tensors.forEach((t, i) => {
    pad(dataStart + offsets[i] - w.length);
    w.bytes(t.data);
  });
  return w.chunks;
}

export { GgmlType };
