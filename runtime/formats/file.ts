// Reading checkpoints a range at a time. Node's readFileSync stops at 2 GiB, and a model read whole sits in
// memory twice (the file's buffer and the arrays made from it). Every reader goes through a ByteSource: a file
// (positioned reads straight into arrays of their final type) or an in-memory buffer (tests, parse* functions).
// Every range is checked against the size before it is read, so a truncated or lying header is a clear error
// naming the file and the tensor, never a short read or a garbage model.
//
// Why positioned reads and not mmap through the addon: loading must work before any spec is compiled (there is
// no addon yet, and `qalora check`/`inspect` need none); the projections are converted on the way in anyway
// (GGUF blocks → blocked32, HF rows → Meta order, f16 → f32), so a mapping would be copied from regardless; and a
// page-cache read into the final array is one memcpy per tensor, with nothing of the file kept resident beyond
// the arrays the model holds. A mapping would only spare the copy of tensors used as they are (norms: kilobytes).
import { closeSync, fstatSync, fsyncSync, openSync, readSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { QaloraError } from '../errors.ts';

export type TypedArray = Uint8Array | Int8Array | Uint16Array | Int16Array | Uint32Array | Int32Array | Float32Array
  | Float64Array | BigUint64Array | BigInt64Array;

export interface TypedArrayCtor<T extends TypedArray> {
  new (length: number): T;
  readonly BYTES_PER_ELEMENT: number;
}

/** Where bytes come from. `where` in every call names what is read, for messages ("f.gguf: tensor 'x': F32 [4]"). */
export interface ByteSource {
  readonly path: string;
  readonly size: number;
  /** How much a header parser should ask for at once: the whole buffer in memory, a chunk from a file. */
  readonly chunk: number;
  /** Bytes [offset, offset + length): a view for a buffer, a fresh array for a file. */
  bytes(offset: number, length: number, where: string): Uint8Array;
  /** Fills `target` with the bytes at `offset` (a reused buffer: no allocation, no fresh pages to fault in). */
  into(target: Uint8Array, offset: number, where: string): void;
  /** `count` elements at `offset`, in a new array of their type that the caller owns (never a view). */
  array<T extends TypedArray>(Ctor: TypedArrayCtor<T>, offset: number, count: number, where: string): T;
  /** Releases the file; later reads fail. A no-op for buffers. */
  close(): void;
}

/**
 * Throws unless [offset, offset + length) lies in a source of `size` bytes. Offsets come from u64 header fields:
 * past 2^53 a double cannot name the byte, so those are refused too rather than silently rounded.
 */
export function checkRange(size: number, offset: number, length: number, where: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || !Number.isSafeInteger(offset + length)) {
    throw new QaloraError(`${where}: ${length} bytes at offset ${offset} are beyond what a file position can address (2^53; lying header?)`);
  }
  if (offset + length > size) {
    throw new QaloraError(`${where} needs ${length} bytes at offset ${offset}, file has ${size} (truncated?)`);
  }
}

/** A new array of `count` elements, with the allocation failure of an absurd size told as such. */
function allocate<T extends TypedArray>(Ctor: TypedArrayCtor<T>, count: number, where: string): T {
  try {
    return new Ctor(count);
  } catch (e) {
    throw new QaloraError(`${where}: cannot allocate ${count * Ctor.BYTES_PER_ELEMENT} bytes (${(e as Error).message})`);
  }
}

/** An in-memory file: ranges are views, arrays are copies (aligned, owned). */
export class BufferSource implements ByteSource {
  readonly size: number;
  readonly chunk = Infinity;
  constructor(private readonly buf: Uint8Array, readonly path = '<buffer>') {
    this.size = buf.byteLength;
  }
  bytes(offset: number, length: number, where: string): Uint8Array {
    checkRange(this.size, offset, length, where);
    return this.buf.subarray(offset, offset + length);
  }
  into(target: Uint8Array, offset: number, where: string): void {
    target.set(this.bytes(offset, target.byteLength, where));
  }
  array<T extends TypedArray>(Ctor: TypedArrayCtor<T>, offset: number, count: number, where: string): T {
    const n = count * Ctor.BYTES_PER_ELEMENT;
    checkRange(this.size, offset, n, where);
    const out = allocate(Ctor, count, where);
    new Uint8Array(out.buffer).set(this.buf.subarray(offset, offset + n));
    return out;
  }
  close(): void { /* nothing held */ }
}

// A FileSource whose owner forgot close() releases its descriptor when it is collected: loaders hand out lazy
// tensors that may be read long after the load, so the descriptor lives exactly as long as they do.
const closer = new FinalizationRegistry<number>((fd) => {
  try { closeSync(fd); } catch { /* already closed */ }
});

/** Largest single read: Node refuses lengths of 2 GiB and more. */
const MAX_READ = 1 << 30;

/**
 * A file read with positioned reads. The descriptor stays open until close(), so lazy tensors read the very
 * file whose header was parsed even if the path is replaced meanwhile (atomic writes rename over it).
 */
export class FileSource implements ByteSource {
  readonly chunk = 1 << 20;
  private fd: number | null;
  private readonly token = {};
  private constructor(readonly path: string, fd: number, readonly size: number) {
    this.fd = fd;
    closer.register(this, fd, this.token);
  }

  /** Opens `path`; `what` names the kind of file for the error ("GGUF file"). */
  static open(path: string, what: string): FileSource {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw new QaloraError(`${path}: cannot read ${what} (${(e as Error).message})`);
    }
    const st = fstatSync(fd);
    if (!st.isFile()) {
      closeSync(fd);
      throw new QaloraError(`${path}: cannot read ${what} (not a regular file)`);
    }
    return new FileSource(path, fd, st.size);
  }

  bytes(offset: number, length: number, where: string): Uint8Array {
    checkRange(this.size, offset, length, where);
    const out = allocate(Uint8Array, length, where);
    this.readInto(out, offset, where);
    return out;
  }

  into(target: Uint8Array, offset: number, where: string): void {
    checkRange(this.size, offset, target.byteLength, where);
    this.readInto(target, offset, where);
  }

  array<T extends TypedArray>(Ctor: TypedArrayCtor<T>, offset: number, count: number, where: string): T {
    checkRange(this.size, offset, count * Ctor.BYTES_PER_ELEMENT, where);
    const out = allocate(Ctor, count, where);
    this.readInto(new Uint8Array(out.buffer, out.byteOffset, out.byteLength), offset, where);
    return out;
  }

  private readInto(target: Uint8Array, offset: number, where: string): void {
    if (this.fd === null) throw new QaloraError(`${where}: ${this.path} was closed before this tensor was read`);
    let done = 0;
    while (done < target.byteLength) {
      const n = readSync(this.fd, target, done, Math.min(MAX_READ, target.byteLength - done), offset + done);
      // The size was checked against fstat at open: a short read means the file shrank since.
      if (n === 0) throw new QaloraError(`${where}: ${this.path} ended at ${offset + done} bytes while reading ${target.byteLength} at offset ${offset} (truncated since it was opened?)`);
      done += n;
    }
  }

  close(): void {
    if (this.fd === null) return;
    closer.unregister(this.token);
    closeSync(this.fd);
    this.fd = null;
  }
}

/** Runs `fn` on the opened file, closing it when `fn` throws (a bad header) and leaving it open otherwise. */
export function withFile<T>(path: string, what: string, fn: (src: FileSource) => T): T {
  const src = FileSource.open(path, what);
  try {
    return fn(src);
  } catch (e) {
    src.close();
    throw e;
  }
}

/**
 * Writes atomically: a temporary file beside the target, fsynced, then renamed over it. `chunks` may be a
 * generator, so a file bigger than memory is written at the memory of its largest chunk.
 */
export function writeFileAtomic(path: string, chunks: Iterable<Uint8Array>): void {
  const tmp = `${path}.tmp-${process.pid}-${Date.now()}`;
  const fd = openSync(tmp, 'w');
  try {
    for (const c of chunks) {
      let done = 0;
      while (done < c.byteLength) done += writeSync(fd, c, done, Math.min(MAX_READ, c.byteLength - done));
    }
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    try { unlinkSync(tmp); } catch { /* already gone */ }
    throw e;
  }
  closeSync(fd);
  renameSync(tmp, path);
}
