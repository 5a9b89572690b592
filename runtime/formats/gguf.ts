// GGUF v1 (u32 counts, string lengths and dims), v2 and v3 (u64): header, metadata KVs, tensor infos, aligned
// data. The header is read incrementally (its vocabulary can be tens of MB) and tensors are read when asked
// for (read()), each range checked against the file size first, so files of any size open in little memory.
// Tensors keep their raw bytes (quantized blocks stay accessible); dequantize on demand.
import { QaloraError } from '../errors.ts';
import { BufferSource, type ByteSource, checkRange, withFile, writeFileAtomic } from './file.ts';
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
  /** Absolute offset of the first byte in the file. */
  fileOffset: number;
  /** Bytes of data (0 for a type this reader cannot size: reading its values reports the type). */
  byteLength: number;
  /** The raw bytes (blocks as stored): read from the file on every call (no cache), a view for a buffer. */
  read(): Uint8Array;
  /** Bytes [at, at + target.length) of the tensor into `target`: large tensors converted a slice at a time. */
  readInto(target: Uint8Array, at: number): void;
}

export interface GgufFile {
  path: string;
  version: number;
  alignment: number;
  metadata: Map<string, GgufKV>;
  tensors: Map<string, GgufTensor>;
  /** Releases the file (tensors can no longer be read); a no-op for a buffer. */
  close(): void;
}

/** Element sizes of the fixed-size value types (0: not fixed). */
const SCALAR_BYTES = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8];

/**
 * Reads the header sequentially through a window of the source: a chunk at a time from a file (refilled when a
 * value runs past it), the whole buffer in memory.
 */
class Reader {
  private win: Uint8Array = new Uint8Array(0);
  private winStart = 0;
  private dv = new DataView(this.win.buffer);
  o = 0;
  /** Counts and lengths are u64 (v2, v3) rather than u32 (v1). */
  wide = true;
  constructor(private readonly src: ByteSource) {}
  private get path(): string { return this.src.path; }
  /** Makes [o, o + n) readable at this.at(); throws naming `what` when the file ends first. */
  need(n: number, what: string): void {
    const size = this.src.size;
    if (!(this.o + n <= size)) {
      throw new QaloraError(`${this.path}: truncated GGUF while reading ${what} (needs ${n} bytes at offset ${this.o}, file has ${size})`);
    }
    if (this.o >= this.winStart && this.o + n <= this.winStart + this.win.byteLength) return;
    const len = Math.min(size - this.o, Math.max(n, this.src.chunk));
    this.win = this.src.bytes(this.o, len, `${this.path}: GGUF header`);
    this.winStart = this.o;
    this.dv = new DataView(this.win.buffer, this.win.byteOffset, this.win.byteLength);
  }
  /** `n` values of at least `min` bytes each must fit in what is left (so a lying count fails before allocating). */
  fits(n: number, min: number, what: string): void {
    if (n * min > this.src.size - this.o) {
      throw new QaloraError(`${this.path}: truncated GGUF while reading ${what} (${n} values of at least ${min} bytes at offset ${this.o}, file has ${this.src.size})`);
    }
  }
  private at(): number { return this.o - this.winStart; }
  u32(what: string): number { this.need(4, what); const v = this.dv.getUint32(this.at(), true); this.o += 4; return v; }
  u64(what: string): number {
    this.need(8, what);
    const v = this.dv.getBigUint64(this.at(), true);
    this.o += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new QaloraError(`${this.path}: ${what} = ${v} is out of range`);
    return Number(v);
  }
  /** A count or length: u32 in v1, u64 from v2. */
  count(what: string): number { return this.wide ? this.u64(what) : this.u32(what); }
  str(what: string): string {
    const n = this.count(`${what} length`);
    this.need(n, what);
    const s = Buffer.from(this.win.buffer, this.win.byteOffset + this.at(), n).toString('utf8');
    this.o += n;
    return s;
  }
  scalar(type: number, what: string): GgufScalar {
    if (type === GgufValueType.STRING) return this.str(what);
    const size = SCALAR_BYTES[type];
    if (size === undefined || size === 0) throw new QaloraError(`${this.path}: ${what} has unknown GGUF value type ${type}`);
    this.need(size, what);
    const dv = this.dv, o = this.at();
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
      this.fits(n, t[1], what);
      this.need(n * t[1], what);
      const out = new t[0](n);
      new Uint8Array((out as unknown as Uint8Array).buffer).set(this.win.subarray(this.at(), this.at() + n * t[1]));
      this.o += n * t[1];
      return { elemType, value: out as unknown as GgufArray };
    }
    if (elemType === GgufValueType.BOOL) {
      this.fits(n, 1, what);
      this.need(n, what);
      const out = Array.from(this.win.subarray(this.at(), this.at() + n), (b) => b !== 0);
      this.o += n;
      return { elemType, value: out };
    }
    // Strings and nested arrays start with a length or a type + count: at least 4 bytes each.
    if (elemType === GgufValueType.STRING) {
      this.fits(n, 4, what);
      const out: string[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = this.str(`${what}[${i}]`);
      return { elemType, value: out };
    }
    if (elemType === GgufValueType.ARRAY) {
      this.fits(n, 4, what);
      const out: GgufArray[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = this.array(`${what}[${i}]`).value;
      return { elemType, value: out };
    }
    throw new QaloraError(`${this.path}: ${what} has unknown GGUF array element type ${elemType}`);
  }
}

/** Opens a GGUF file: reads its header now and each tensor's bytes when asked (GgufTensor.read). */
export function readGguf(path: string): GgufFile {
  return withFile(path, 'GGUF file', (src) => parseGgufSource(src));
}

/** A GGUF file already in memory; tensors' read() returns views into `buf`. */
export function parseGguf(buf: Uint8Array, path = '<buffer>'): GgufFile {
  return parseGgufSource(new BufferSource(buf, path));
}

function parseGgufSource(src: ByteSource): GgufFile {
  const path = src.path;
  const h = new Reader(src);
  if (src.size < 8 || h.u32('magic') !== GGUF_MAGIC) throw new QaloraError(`${path}: not a GGUF file (missing "GGUF" magic)`);
  const version = h.u32('version');
  if (version < 1 || version > 3) throw new QaloraError(`${path}: GGUF version ${version} is not supported (1, 2, 3)`);
  h.wide = version >= 2;
  const nTensors = h.count('tensor count');
  const nKv = h.count('metadata count');
  // Each KV is at least a key length, a type and a value byte; each tensor info at least a name length,
  // n_dims, a dim, a type and an offset.
  h.fits(nKv, version >= 2 ? 13 : 9, 'metadata');
  const metadata = new Map<string, GgufKV>();
  for (let i = 0; i < nKv; i++) {
    const key = h.str(`metadata key #${i}`);
    const type = h.u32(`type of metadata '${key}'`);
    if (type === GgufValueType.ARRAY) {
      const { elemType, value } = h.array(`metadata '${key}'`);
      metadata.set(key, { type, elemType, value });
    } else {
      metadata.set(key, { type, value: h.scalar(type, `metadata '${key}'`) });
    }
  }
  const alignKv = metadata.get('general.alignment');
  const alignment = alignKv === undefined ? 32 : Number(alignKv.value);
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new QaloraError(`${path}: general.alignment ${alignKv?.value} must be a power of two`);
  }
  h.fits(nTensors, version >= 2 ? 32 : 24, 'tensor infos');
  const infos: { name: string; dims: number[]; type: number; offset: number }[] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = h.str(`tensor #${i} name`);
    const nDims = h.u32(`tensor '${name}' n_dims`);
    if (nDims < 1 || nDims > 4) throw new QaloraError(`${path}: tensor '${name}' has ${nDims} dimensions (1 to 4 allowed)`);
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(h.count(`tensor '${name}' dims`));
    const type = h.u32(`tensor '${name}' type`);
    const offset = h.u64(`tensor '${name}' offset`);
    infos.push({ name, dims, type, offset });
  }
  const dataStart = Math.ceil(h.o / alignment) * alignment;
  const tensors = new Map<string, GgufTensor>();
  for (const t of infos) {
    const where = `${path}: tensor '${t.name}'`;
    const elems = t.dims.reduce((a, b) => a * b, 1);
    if (!Number.isSafeInteger(elems)) throw new QaloraError(`${where}: dims [${t.dims}] overflow (more than 2^53 elements; lying header?)`);
    let bytes: number;
    try {
      bytes = ggmlBytes(t.type, t.dims[0], elems, where);
    } catch (e) {
      // Keep unreadable tensors listed (metadata-only uses work); reading their values reports the type.
      if (!(e instanceof QaloraError)) throw e;
      bytes = 0;
    }
    if (t.offset % alignment !== 0) throw new QaloraError(`${where}: offset ${t.offset} is not a multiple of the alignment ${alignment}`);
    const fileOffset = dataStart + t.offset;
    const what = `${where}: ${ggmlTypeName(t.type)} [${t.dims}]`;
    checkRange(src.size, fileOffset, bytes, what);
    const read = bytes === 0 ? () => new Uint8Array(0) : () => src.bytes(fileOffset, bytes, what);
    const readInto = (target: Uint8Array, at: number) => {
      if (at < 0 || at + target.byteLength > bytes) throw new QaloraError(`${what}: bytes [${at}, ${at + target.byteLength}) are outside its ${bytes}`);
      src.into(target, fileOffset + at, what);
    };
    tensors.set(t.name, { ...t, fileOffset, byteLength: bytes, read, readInto });
  }
  return { path, version, alignment, metadata, tensors, close: () => src.close() };
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
  const bytes = t.read();
  // A file read is a fresh array holding exactly these bytes: F32 is used as it is, not copied a second time.
  if (t.type === GgmlType.F32 && bytes.byteOffset === 0 && bytes.buffer.byteLength === bytes.byteLength) return new Float32Array(bytes.buffer);
  return dequantize(t.type, bytes, elems, `${f.path}: tensor '${name}'`);
}

// ---- Writing (tests, export) ----------------------------------------------------------------------------

/**
 * A tensor to write: its bytes in memory (`data`), or read when the writer reaches it (`read()`, called once) —
 * a GgufTensor of an opened file is one, so untouched tensors are copied over byte for byte.
 */
export type GgufWriteTensor = { name: string; dims: number[]; type: number } & ({ data: Uint8Array } | { read(): Uint8Array });

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

/** Where a GGUF file's tensors go: the header's bytes (padded to the data start) and each tensor's size and offset. */
export interface GgufLayout {
  /** Magic through tensor infos, padded with zeros to the aligned start of the data section. */
  header: Uint8Array;
  /** Each tensor's absolute file offset and byte size, in the order given. */
  offsets: number[];
  sizes: number[];
  /** The file's total size. */
  size: number;
}

/**
 * Lays out a GGUF file (v1 with u32 counts, v2/v3 with u64), tensors aligned to `alignment`, without their data:
 * the header is built from names, dims and types alone (so a sparse test file or a streamed write needs no bytes).
 */
export function ggufLayout(kvs: GgufWriteKV[], tensors: { name: string; dims: number[]; type: number }[], version = 3, alignment = 32): GgufLayout {
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
  const rel: number[] = [], sizes: number[] = [];
  for (const t of tensors) {
    const elems = t.dims.reduce((a, b) => a * b, 1);
    const bytes = ggmlBytes(t.type, t.dims[0], elems, `tensor '${t.name}'`);
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.count(d);
    w.u32(t.type);
    w.u64(offset);
    rel.push(offset);
    sizes.push(bytes);
    offset = Math.ceil((offset + bytes) / alignment) * alignment;
  }
  const dataStart = Math.ceil(w.length / alignment) * alignment;
  // One header buffer rather than thousands of small chunks (the vocabulary): one write, not a syscall each.
  const header = new Uint8Array(dataStart);
  let at = 0;
  for (const c of w.chunks) { header.set(c, at); at += c.byteLength; }
  const offsets = rel.map((o) => dataStart + o);
  const size = tensors.length ? offsets[offsets.length - 1] + sizes[sizes.length - 1] : dataStart;
  return { header, offsets, sizes, size };
}

/** The file as a sequence of chunks: the header, then each tensor's bytes obtained only when reached. */
function* ggufChunks(kvs: GgufWriteKV[], tensors: GgufWriteTensor[], version: number, alignment: number): Generator<Uint8Array> {
  for (const t of tensors) if ('data' in t) checkLength(t, t.data, ggmlBytes(t.type, t.dims[0], t.dims.reduce((a, b) => a * b, 1), `tensor '${t.name}'`));
  const layout = ggufLayout(kvs, tensors, version, alignment);
  yield layout.header;
  let at = layout.header.byteLength;
  for (let i = 0; i < tensors.length; i++) {
    if (layout.offsets[i] > at) yield new Uint8Array(layout.offsets[i] - at);
    const t = tensors[i];
    const data = 'data' in t ? t.data : t.read();
    checkLength(t, data, layout.sizes[i]);
    yield data;
    at = layout.offsets[i] + data.byteLength;
  }
}

function checkLength(t: GgufWriteTensor, data: Uint8Array, bytes: number): void {
  if (bytes !== data.byteLength) throw new QaloraError(`tensor '${t.name}': ${data.byteLength} bytes, ${ggmlTypeName(t.type)} [${t.dims}] needs ${bytes}`);
}

/** Serialises a GGUF file in memory (v1 with u32 counts, v2/v3 with u64), tensors aligned to `alignment`. */
export function serializeGguf(kvs: GgufWriteKV[], tensors: GgufWriteTensor[], version = 3, alignment = 32): Uint8Array[] {
  return [...ggufChunks(kvs, tensors, version, alignment)];
}

/**
 * Writes a GGUF file atomically (temporary file, fsync, rename), one tensor at a time: tensors given by read()
 * are read as the writer reaches them, so a 4 GB file is written at the memory of its largest tensor. The bytes
 * are those serializeGguf gives. Returns the file's size.
 */
export function writeGguf(path: string, kvs: GgufWriteKV[], tensors: GgufWriteTensor[], version = 3, alignment = 32): number {
  let size = 0;
  writeFileAtomic(path, (function* () {
    for (const c of ggufChunks(kvs, tensors, version, alignment)) {
      size += c.byteLength;
      yield c;
    }
  })());
  return size;
}

export { GgmlType };
