// Named, growable work buffers: a model step reuses the same memory call after call instead of allocating.
export class Scratch {
  private readonly f32 = new Map<string, Float32Array>();
  private readonly u16 = new Map<string, Uint16Array>();
  private readonly i32 = new Map<string, Int32Array>();

  /** A Float32Array of exactly n elements under `name` (contents unspecified). */
  f(name: string, n: number): Float32Array {
    return view(this.f32, name, n, (k) => new Float32Array(k));
  }
  h(name: string, n: number): Uint16Array {
    return view(this.u16, name, n, (k) => new Uint16Array(k));
  }
  i(name: string, n: number): Int32Array {
    return view(this.i32, name, n, (k) => new Int32Array(k));
  }
}

function view<T extends Float32Array | Uint16Array | Int32Array>(map: Map<string, T>, name: string, n: number, make: (n: number) => T): T {
  let buf = map.get(name);
  if (!buf || buf.length < n) {
    buf = make(Math.max(n, buf ? Math.ceil(buf.length * 1.5) : 0));
    map.set(name, buf);
  }
  return (buf.length === n ? buf : buf.subarray(0, n)) as T;
}
