// Files of any size: tensors past 4 GiB in sparse files (a 5 GiB file that takes a few KB of disk: ftruncate,
// then write only the header and the tensors read), lying and truncated headers that must fail with the file and
// the tensor named before anything is read, the streamed writers (byte-identical to the in-memory ones and to the
// writer before streaming), and a sharded HF checkpoint read lazily.
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import {
  type GgufWriteKV, type GgufWriteTensor, GgufValueType as T, ggufLayout, ggufTensorF32, readGguf, serializeGguf, writeGguf,
} from '../runtime/formats/gguf.ts';
import { readHfModel, writeHfModel } from '../runtime/formats/hf.ts';
import { readLlama2c } from '../runtime/formats/llama2c.ts';
import {
  asF32, openSafetensors, readSafetensors, readTensor, serializeSafetensors, tensorOf, writeSafetensors,
} from '../runtime/safetensors.ts';
import { fixture, needs } from './fixtures.ts';
import { expectSameWeights, floatOf } from './formats-helpers.ts';

const GiB = 2 ** 30;
const dir = mkdtempSync(join(tmpdir(), 'qalora-large-'));

/** Writes `parts` (offset → bytes) into a file of `size` bytes; the rest is a hole (zeros, no disk). */
function sparse(name: string, size: number, parts: [number, Uint8Array][]): string {
  const path = join(dir, name);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const [at, bytes] of parts) writeSync(fd, bytes, 0, bytes.byteLength, at);
  } finally {
    closeSync(fd);
  }
  return path;
}

const f32Bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function errorOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(QaloraError);
    return (e as Error).message;
  }
  throw new Error('no error');
}

describe('GGUF beyond 4 GiB', () => {
  // 'pad' is a 4 GiB tensor that is never read: it only pushes 'far' past 4 GiB, as a 7B model's layers would.
  const near = Float32Array.from({ length: 8 }, (_, i) => i + 0.5);
  const far = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * 100);
  const q8 = Uint8Array.from({ length: 2 * 34 }, (_, i) => (i * 37) & 255);
  const infos = [
    { name: 'near', dims: [8], type: GgmlType.F32 },
    { name: 'pad', dims: [GiB + 8], type: GgmlType.F32 },
    { name: 'far', dims: [16, 4], type: GgmlType.F32 },
    { name: 'far_q8', dims: [32, 2], type: GgmlType.Q8_0 },
  ];
  const kvs: GgufWriteKV[] = [['general.architecture', T.STRING, 'llama'], ['tokenizer.ggml.tokens', T.ARRAY, ['a', 'b'], T.STRING]];
  const layout = ggufLayout(kvs, infos, 3, 32);
  const file = () => sparse('big.gguf', layout.size, [
    [0, layout.header], [layout.offsets[0], f32Bytes(near)], [layout.offsets[2], f32Bytes(far)], [layout.offsets[3], q8],
  ]);

  it('opens a sparse 5 GiB file and reads tensors past 4 GiB exactly', () => {
    expect(layout.offsets[2]).toBeGreaterThan(4 * GiB);
    const f = readGguf(file());
    try {
      const t = f.tensors.get('far')!;
      expect([t.fileOffset, t.byteLength, t.offset]).toEqual([layout.offsets[2], 256, layout.offsets[2] - layout.header.byteLength]);
      expect(Array.from(ggufTensorF32(f, 'far', [16, 4]))).toEqual(Array.from(far));
      expect(Array.from(ggufTensorF32(f, 'near'))).toEqual(Array.from(near));
      expect(Buffer.from(f.tensors.get('far_q8')!.read()).equals(Buffer.from(q8))).toBe(true);
      // read() reads again on every call: a fresh array, never a cached one.
      expect(t.read()).not.toBe(t.read());
    } finally {
      f.close();
    }
  });

  it('a file cut short fails at open, naming the file, the tensor, its type, shape and offsets', () => {
    const path = file();
    const fd = openSync(path, 'r+');
    ftruncateSync(fd, layout.offsets[3] + 10);
    closeSync(fd);
    expect(errorOf(() => readGguf(path))).toMatch(
      new RegExp(`big\\.gguf: tensor 'far_q8': Q8_0 \\[32,2\\] needs 68 bytes at offset ${layout.offsets[3]}, file has ${layout.offsets[3] + 10} \\(truncated\\?\\)`));
  });

  it('lying headers: counts past the end, dims that overflow, offsets past 2^53', () => {
    const write = (name: string, bytes: Uint8Array) => { writeFileSync(join(dir, name), bytes); return join(dir, name); };
    // A tensor count of 2^40 in a 100-byte file: refused before anything is allocated.
    const counts = new Uint8Array(ggufLayout(kvs, [], 3).header);
    new DataView(counts.buffer).setBigUint64(8, 2n ** 40n, true);
    expect(errorOf(() => readGguf(write('count.gguf', counts)))).toMatch(/count\.gguf: truncated GGUF while reading tensor infos \(1099511627776 values/);
    // dims whose product is past 2^53 elements
    const huge = ggufLayout(kvs, [{ name: 'huge', dims: [2 ** 40, 2 ** 40], type: GgmlType.F32 }]).header;
    expect(errorOf(() => readGguf(write('dims.gguf', huge)))).toMatch(/dims\.gguf: tensor 'huge': dims \[1099511627776,1099511627776\] overflow/);
    // a tensor offset past 2^53: patch the u64 offset of the only tensor (the last 8 bytes of its info)
    const one = ggufLayout(kvs, [{ name: 'x', dims: [8], type: GgmlType.F32 }]);
    const bytes = new Uint8Array(one.size);
    bytes.set(one.header);
    const infoEnd = one.header.lastIndexOf(0x78) + 1 + 4 + 8 + 4; // 'x', n_dims, dims[0], type
    new DataView(bytes.buffer).setBigUint64(infoEnd, 2n ** 60n, true);
    expect(errorOf(() => readGguf(write('off.gguf', bytes)))).toMatch(/off\.gguf: tensor 'x' offset = 1152921504606846976 is out of range/);
    // a directory or a missing file
    expect(errorOf(() => readGguf(dir))).toMatch(/cannot read GGUF file \(not a regular file\)/);
    expect(errorOf(() => readGguf(join(dir, 'none.gguf')))).toMatch(/none\.gguf: cannot read GGUF file \(ENOENT/);
  });
});

describe('safetensors beyond 4 GiB', () => {
  const far = Float32Array.from({ length: 32 }, (_, i) => i * -1.25);
  /** A header placing 'pad' (4 GiB of U8, never read) before 'far'. */
  function header(extra: Record<string, unknown> = {}): Uint8Array {
    const padBytes = 4 * GiB + 64;
    let json = JSON.stringify({
      __metadata__: { format: 'pt' },
      small: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      pad: { dtype: 'U8', shape: [padBytes], data_offsets: [8, 8 + padBytes] },
      far: { dtype: 'F32', shape: [4, 8], data_offsets: [8 + padBytes, 8 + padBytes + 128] },
      ...extra,
    });
    json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
    const head = new Uint8Array(8 + json.length);
    new DataView(head.buffer).setBigUint64(0, BigInt(json.length), true);
    head.set(Buffer.from(json), 8);
    return head;
  }
  const head = header();
  const farAt = head.byteLength + 8 + 4 * GiB + 64;

  it('opens a sparse file and reads a tensor past 4 GiB, header by positioned reads only', () => {
    const path = sparse('big.safetensors', farAt + 128, [[0, head], [head.byteLength, f32Bytes(Float32Array.of(3, 4))], [farAt, f32Bytes(far)]]);
    const f = openSafetensors(path);
    try {
      const t = f.tensors.get('far')!;
      expect([t.offset, t.byteLength, t.file]).toEqual([farAt, 128, path]);
      expect(Array.from(asF32(readTensor(t)))).toEqual(Array.from(far));
      expect(Array.from(asF32(readTensor(f.tensors.get('small')!)))).toEqual([3, 4]);
      expect(f.metadata).toEqual({ format: 'pt' });
    } finally {
      f.close();
    }
  });

  it('truncated and lying headers name the file and the tensor', () => {
    const cut = sparse('cut.safetensors', farAt + 100, [[0, head]]);
    expect(errorOf(() => openSafetensors(cut))).toMatch(/cut\.safetensors: tensor 'far': data_offsets \[\d+, \d+\] run past the data buffer \(\d+ bytes; file truncated\?\)/);
    const len = new Uint8Array(16);
    new DataView(len.buffer).setBigUint64(0, 2n ** 40n, true);
    writeFileSync(join(dir, 'len.safetensors'), len);
    expect(errorOf(() => openSafetensors(join(dir, 'len.safetensors')))).toMatch(/len\.safetensors: safetensors header length 1099511627776 exceeds the file size 16/);
    const over = header({ huge: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 8] } });
    const o = sparse('over.safetensors', farAt + 4096, [[0, over]]);
    expect(errorOf(() => openSafetensors(o))).toMatch(/over\.safetensors: tensor 'huge': shape \[1099511627776,1099511627776\] of F32 overflows/);
    const inexact = header({ big: { dtype: 'U8', shape: [1], data_offsets: [2 ** 60, 2 ** 60 + 1] } });
    const i = sparse('inexact.safetensors', farAt + 4096, [[0, inexact]]);
    expect(errorOf(() => openSafetensors(i))).toMatch(/inexact\.safetensors: tensor 'big': data_offsets must be \[begin, end\] with 0 ≤ begin ≤ end < 2\^53/);
    expect(errorOf(() => readSafetensors(join(dir, 'missing.safetensors')))).toMatch(/missing\.safetensors: cannot read safetensors file/);
  });

  it('a file that shrinks after it was opened fails on read, not with garbage', () => {
    const path = sparse('shrink.safetensors', farAt + 128, [[0, head], [farAt, f32Bytes(far)]]);
    const f = openSafetensors(path);
    try {
      const fd = openSync(path, 'r+');
      ftruncateSync(fd, farAt + 64);
      closeSync(fd);
      expect(errorOf(() => f.tensors.get('far')!.read())).toMatch(/tensor 'far': F32 \[4,8\]: .*shrink\.safetensors ended at \d+ bytes .*truncated since it was opened/);
    } finally {
      f.close();
    }
    expect(errorOf(() => f.tensors.get('small')!.read())).toMatch(/was closed before this tensor was read/);
  });
});

describe('streamed writers', () => {
  // The case the writer before streaming serialised to these digests (computed with that version's serializeGguf).
  const bytesOf = (n: number, seed: number) => Uint8Array.from({ length: n }, (_, i) => (i * 131 + seed * 17) & 255);
  const kvs: GgufWriteKV[] = [
    ['general.architecture', T.STRING, 'llama'], ['u8', T.U8, 200], ['i8', T.I8, -100], ['u16', T.U16, 60000], ['i16', T.I16, -30000],
    ['u32', T.U32, 4_000_000_000], ['i32', T.I32, -2_000_000_000], ['f32', T.F32, 0.5], ['bool', T.BOOL, true],
    ['str', T.STRING, 'héllo ▁'], ['u64', T.U64, 2n ** 40n], ['i64', T.I64, -(2n ** 40n)], ['f64', T.F64, 0.1],
    ['arr.f32', T.ARRAY, Float32Array.of(1, 2.5), T.F32], ['arr.str', T.ARRAY, ['a', '', '▁b'], T.STRING],
    ['arr.bool', T.ARRAY, [true, false], T.BOOL], ['arr.i32', T.ARRAY, Int32Array.of(-1, 7), T.I32],
  ];
  const tensors: GgufWriteTensor[] = [
    { name: 'a', dims: [3], type: GgmlType.F32, data: bytesOf(12, 1) },
    { name: 'q4', dims: [64, 3], type: GgmlType.Q4_1, data: bytesOf(3 * 2 * 20, 2) },
    { name: 'q8', dims: [32, 2], type: GgmlType.Q8_0, data: bytesOf(2 * 34, 3) },
    { name: 'h', dims: [5], type: GgmlType.F16, data: bytesOf(10, 4) },
  ];
  const before: Record<string, string> = {
    '1/32': 'c876b0542b803fbfa15188e5ec1969935d4ff7c79b4a06d65256101c8993460d',
    '1/64': '3cbcb0af1ffc6ddecddfac45ef9e4dc5caa284cc9e37357b65e298a255eac710',
    '2/32': 'a31f8b1626d2d070cefd7d1c7eaf73725b07673440adddd853214bf5d2d44f35',
    '2/64': '3da523d157cd935ddc90277be612fb48eeb728acca5f931c5aa4aac1b7b3e82b',
    '3/32': '6dd2ed30999bf2d487cdec5ac54242c6a4fc5586bbe8897bb43d7a63ebd23674',
    '3/64': 'ffa6da8d6aa811c3f1d011167b36e27d834d1cae45a621c21b07b51fac4e4dc3',
  };
  const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

  it('writeGguf streams tensors read on demand, byte-identical to serializeGguf and to the writer before streaming', () => {
    for (const [key, digest] of Object.entries(before)) {
      const [version, align] = key.split('/').map(Number);
      let reads = 0;
      // Lazy tensors: each read() is called once, when the writer reaches it.
      const lazy: GgufWriteTensor[] = tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, read: () => { reads++; return (t as { data: Uint8Array }).data; } }));
      const path = join(dir, `w${version}-${align}.gguf`);
      const size = writeGguf(path, kvs, lazy, version, align);
      expect(reads).toBe(tensors.length);
      const written = readFileSync(path);
      expect(size).toBe(written.byteLength);
      expect(sha(written), key).toBe(digest);
      expect(sha(Buffer.concat(serializeGguf(kvs, tensors, version, align))), key).toBe(digest);
    }
    // a tensor whose bytes disagree with its type and dims fails, and leaves no file behind
    const bad = join(dir, 'bad.gguf');
    expect(() => writeGguf(bad, kvs, [{ name: 'x', dims: [4], type: GgmlType.F32, read: () => new Uint8Array(12) }]))
      .toThrow(/tensor 'x': 12 bytes, F32 \[4\] needs 16/);
    expect(() => readFileSync(bad)).toThrow(/ENOENT/);
  });

  it('copies an opened GGUF tensor for tensor: the file comes back byte for byte', needs('models/tiny-random-gguf/llama-2-tiny-random.gguf'), () => {
    const src = fixture('models/tiny-random-gguf/llama-2-tiny-random.gguf');
    const f = readGguf(src);
    const kv: GgufWriteKV[] = [...f.metadata].map(([k, v]) => [k, v.type, v.value, v.elemType]);
    const copy = join(dir, 'copy.gguf');
    writeGguf(copy, kv, [...f.tensors.values()], f.version, f.alignment);
    f.close();
    expect(readFileSync(copy).equals(readFileSync(src))).toBe(true);
  });

  it('writeSafetensors streams lazy tensors (a file copied through its StoredTensors) like serializeSafetensors', () => {
    const eager = {
      w: tensorOf('F32', [2, 3], Float32Array.of(1, 2, 3, 4, 5, 6)),
      q: tensorOf('U32', [2], Uint32Array.of(7, 0xffffffff)),
      h: tensorOf('F16', [3], Uint16Array.of(1, 2, 3)),
    };
    const a = join(dir, 'a.safetensors'), b = join(dir, 'b.safetensors');
    writeSafetensors(a, eager, { k: 'v' });
    expect(readFileSync(a).equals(Buffer.concat(serializeSafetensors(eager, { k: 'v' })))).toBe(true);
    const opened = openSafetensors(a);
    writeSafetensors(b, opened.tensors, opened.metadata);
    opened.close();
    expect(readFileSync(b).equals(readFileSync(a))).toBe(true);
    expect(() => writeSafetensors(join(dir, 'c.safetensors'), { x: { dtype: 'F32', shape: [2], read: () => new Uint8Array(4) } }))
      .toThrow(/tensor 'x': 4 bytes but shape \[2\] of F32 needs 8/);
  });
});

describe('sharded HF checkpoints', () => {
  it('two shards and an index load lazily, one tensor at a time, equal to the source', needs('models/stories260K/stories260K.bin'), () => {
    const w = readLlama2c(fixture('models/stories260K/stories260K.bin'));
    const d = join(dir, 'sharded');
    writeHfModel(d, w, { shards: 2 });
    const index = JSON.parse(readFileSync(join(d, 'model.safetensors.index.json'), 'utf8'));
    expect(new Set(Object.values(index.weight_map)).size).toBe(2);
    const back = readHfModel(d);
    const q = back.blocks[3].proj.q;
    expect(q.kind).toBe('file');
    if (q.kind === 'file') expect(q.source).toMatch(/model-0000[12]-of-00002\.safetensors: tensor 'model\.layers\.3\.self_attn\.q_proj\.weight'/);
    expectSameWeights(w, back);
    expect(Array.from(floatOf(back.blocks[4].proj.down).subarray(0, 8))).toEqual(Array.from(floatOf(w.blocks[4].proj.down).subarray(0, 8)));
    // An index naming a tensor its shard lacks is refused at load, naming both.
    index.weight_map['model.layers.0.mlp.extra.weight'] = Object.values(index.weight_map)[0];
    writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify(index));
    expect(errorOf(() => readHfModel(d))).toMatch(/model-00001-of-00002\.safetensors: tensor 'model\.layers\.0\.mlp\.extra\.weight' listed in .*index\.json is not in the shard/);
  });
});
