// Who owns a tensor's memory while a model runs. On the cpu backend a tensor is a host typed array (a mapped
// file's or the heap's); on cuda and emu it is a DeviceTensor of the backend's pool, and the weights, the
// activations, the KV caches and the adapters stay there: a step sends token ids and positions up and reads
// logits (or a loss) back. The model code is written once against the types and the Memory below.
import type { DeviceApi, DeviceTensor } from '../native.ts';

export type F32 = Float32Array | DeviceTensor<'f32'>;
export type I32 = Int32Array | DeviceTensor<'i32'>;
export type U16 = Uint16Array | DeviceTensor<'u16'>;
export type U32 = Uint32Array | DeviceTensor<'u32'>;
export type Tensor = F32 | I32 | U16 | U32;
type HostOf<T> = T extends DeviceTensor<'f32'> | Float32Array ? Float32Array : T extends DeviceTensor<'i32'> | Int32Array ? Int32Array : T extends DeviceTensor<'u16'> | Uint16Array ? Uint16Array : Uint32Array;
type HostArray = Float32Array | Int32Array | Uint16Array | Uint32Array;
/** The tensor type that holds a host array of this kind. */
export type TensorOf<H extends HostArray> = H extends Float32Array ? F32 : H extends Int32Array ? I32 : H extends Uint16Array ? U16 : U32;

export interface Memory {
  /** true: tensors are device memory (cuda, emu); false: host arrays. */
  readonly device: boolean;
  f32(n: number): F32;
  i32(n: number): I32;
  u16(n: number): U16;
  /**
   * A tensor with a host array's contents: the array itself on the host; on a device, an upload made once per
   * array (weights are uploaded when the model is built, and a table shared by embedding and classifier once).
   */
  resident<H extends HostArray>(a: H): TensorOf<H>;
  /** Uploads a's current contents into t (same length); the host array itself on the host. */
  write<T extends Tensor>(t: T, a: HostOf<T>): void;
  /** t's contents on the host: into `into` (downloaded on a device, the one wait of a step), or t itself on the host. */
  read(t: F32, into: Float32Array): Float32Array;
  /** Elements [offset, offset + length) of t, on the same memory. */
  view<T extends Tensor>(t: T, offset: number, length: number): T;
  /** src into dst at offset (dst.length ≥ offset + src.length). */
  copy<T extends Tensor>(dst: T, src: T, offset?: number): void;
  /** Gives t's memory back now (a device tensor to its pool) instead of at garbage collection. */
  free(t: Tensor): void;
}

export const hostMemory: Memory = {
  device: false,
  f32: (n) => new Float32Array(n),
  i32: (n) => new Int32Array(n),
  u16: (n) => new Uint16Array(n),
  resident: (a) => a as never,
  write: (t, a) => {
    if ((t as unknown) !== a) (t as HostArray).set(a);
  },
  read: (t, into) => (t === into ? into : (into.set(t as Float32Array), into)),
  view: (t, offset, length) => (offset === 0 && length === (t as HostArray).length ? t : ((t as HostArray).subarray(offset, offset + length) as never)),
  copy: (dst, src, offset = 0) => (dst as HostArray).set(src as never, offset),
  free: () => {},
};

export function deviceMemory(api: DeviceApi): Memory {
  const uploaded = new WeakMap<HostArray, Tensor>();
  const dtypeOf = (a: HostArray) => (a instanceof Float32Array ? 'f32' : a instanceof Int32Array ? 'i32' : a instanceof Uint16Array ? 'u16' : 'u32');
  return {
    device: true,
    f32: (n) => api.alloc('f32', n),
    i32: (n) => api.alloc('i32', n),
    u16: (n) => api.alloc('u16', n),
    resident: (a) => {
      let t = uploaded.get(a);
      if (!t) {
        const d = api.alloc(dtypeOf(a), a.length);
        d.upload(a as never);
        t = d as Tensor;
        uploaded.set(a, t);
      }
      return t as never;
    },
    write: (t, a) => (t as DeviceTensor).upload(a as never),
    read: (t, into) => (t as DeviceTensor<'f32'>).download(into),
    view: (t, offset, length) => (offset === 0 && length === (t as DeviceTensor).length ? t : ((t as DeviceTensor).view(offset, length) as never)),
    copy: (dst, src, offset = 0) => (dst as DeviceTensor).copyFrom(src as never, offset),
    free: (t) => (t as DeviceTensor).release(),
  };
}

/**
 * A typed record of per-row buffers (for m rows: `widths` elements per row each), grown when more rows are asked
 * for and handed out as views of exactly m rows. A renamed field is a compile error, not a silent new buffer.
 */
export class RowBuffers<K extends string> {
  private capacity = 0;
  private full?: Record<K, F32>;
  private last?: { m: number; views: Record<K, F32> };

  constructor(private readonly mem: Memory, private readonly widths: Record<K, number>) {}

  rows(m: number): Record<K, F32> {
    if (this.last?.m === m) return this.last.views;
    if (m > this.capacity) {
      const cap = Math.max(m, Math.ceil(this.capacity * 1.5));
      this.full = mapValues(this.widths, (w) => this.mem.f32(cap * w));
      this.capacity = cap;
    }
    const views = mapValues(this.widths, (w, k) => this.mem.view(this.full![k], 0, m * w));
    this.last = { m, views };
    return views;
  }
}

/** One tensor grown on demand and handed out as a view of exactly n elements (ids, positions, casts). */
export class Grown<T extends Tensor> {
  private buf?: T;
  constructor(private readonly mem: Memory, private readonly make: (n: number) => T) {}
  get(n: number): T {
    const have = this.buf ? this.buf.length : 0;
    if (n > have) this.buf = this.make(Math.max(n, Math.ceil(have * 1.5)));
    return this.mem.view(this.buf!, 0, n);
  }
}

function mapValues<K extends string, A, B>(o: Record<K, A>, f: (a: A, k: K) => B): Record<K, B> {
  const out = {} as Record<K, B>;
  for (const k of Object.keys(o) as K[]) out[k] = f(o[k], k);
  return out;
}
