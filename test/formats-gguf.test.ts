import { readFileSync } from 'node:fs';
import llamaTokenizer from 'llama-tokenizer-js';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { dequantize, GgmlType } from '../runtime/formats/ggml-types.ts';
import { type GgufWriteKV, type GgufWriteTensor, GgufValueType as T, parseGguf, readGguf, serializeGguf } from '../runtime/formats/gguf.ts';
import { ggufToLlama, ggufTokenizer } from '../runtime/formats/gguf-llama.ts';
import { readLlama2c } from '../runtime/formats/llama2c.ts';
import type { FloatLinear } from '../runtime/model/types.ts';
import { f16BitsToF32, f32ToF16Bits } from '../runtime/safetensors.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { fixture, needs } from './fixtures.ts';
import { expectSameWeights, floatOf } from './formats-helpers.ts';

const V1 = 'models/stories260K/stories260K-f32.gguf-v1.gguf';
const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const V3 = 'models/tiny-random-gguf/llama-2-tiny-random.gguf';

const concat = (chunks: Uint8Array[]) => new Uint8Array(Buffer.concat(chunks));
const f16 = (x: number) => f32ToF16Bits(x);

describe('GGUF', () => {
  it('stories260K GGUF v1 equals the llama2.c .bin bit for bit, tokenizer included', needs(V1, BIN, TOK), () => {
    const f = readGguf(fixture(V1));
    expect(f.version).toBe(1);
    const g = ggufToLlama(f);
    const b = readLlama2c(fixture(BIN));
    expectSameWeights(b, g);
    expect(g.classifier).toBe(g.tokEmbedding); // output.weight is a copy of the embedding: tied
    const gt = ggufTokenizer(f);
    const bt = readLlama2cTokenizer(fixture(TOK));
    for (const s of ['Once upon a time', 'Hello, world!', 'Tim said: "Wow!" 😀\n\nThe end.']) {
      expect(gt.encode(s, { bos: true })).toEqual(bt.encode(s, { bos: true }));
      expect(gt.decode(gt.encode(s, { bos: true }))).toBe(s);
    }
  });

  it('tiny-random GGUF v3 (F16 weights) loads; values match bytes read independently; vocabulary matches the oracle', needs(V3), () => {
    const raw = readFileSync(fixture(V3));
    const f = readGguf(fixture(V3));
    expect(f.version).toBe(3);
    const w = ggufToLlama(f);
    expect(w.config).toMatchObject({ dim: 8, hidden: 32, layers: 1, heads: 2, kvHeads: 2, vocab: 32000, context: 4096, tiedClassifier: false });
    // the data section starts at the aligned end of the header; attn_q is F16 [8, 8]
    const q = f.tensors.get('blk.0.attn_q.weight')!;
    const dataStart = q.fileOffset - q.offset;
    expect(dataStart % 32).toBe(0);
    const qw = floatOf(w.blocks[0].proj.q);
    for (let i = 0; i < 64; i++) expect(qw[i]).toBe(f16BitsToF32(raw.readUInt16LE(dataStart + q.offset + 2 * i)));
    expect(w.blocks[0].proj.down.in).toBe(32);
    const tok = ggufTokenizer(f);
    expect(tok.encode('Hello, world!', { bos: true })).toEqual([1, 15043, 29892, 3186, 29991]);
    for (const s of ['naïve café', 'emoji 😀🎉', '日本語', 'tabs\t\tand  spaces\n\n', '<s> is not BOS here']) {
      expect(tok.encode(s, { bos: true }), s).toEqual(llamaTokenizer.encode(s, true, true));
    }
  });

  it('writes and reads back v1, v2 and v3 with every metadata type and a custom alignment', () => {
    const kvs: GgufWriteKV[] = [
      ['u8', T.U8, 200], ['i8', T.I8, -100], ['u16', T.U16, 60000], ['i16', T.I16, -30000],
      ['u32', T.U32, 4_000_000_000], ['i32', T.I32, -2_000_000_000], ['f32', T.F32, 0.5], ['bool', T.BOOL, true],
      ['str', T.STRING, 'héllo ▁'], ['u64', T.U64, 2n ** 40n], ['i64', T.I64, -(2n ** 40n)], ['f64', T.F64, 0.1],
      ['general.alignment', T.U32, 64],
      ['arr.f32', T.ARRAY, Float32Array.of(1, 2.5), T.F32], ['arr.str', T.ARRAY, ['a', '', '▁b'], T.STRING],
      ['arr.bool', T.ARRAY, [true, false], T.BOOL], ['arr.i32', T.ARRAY, Int32Array.of(-1, 7), T.I32],
    ];
    const tensors: GgufWriteTensor[] = [
      { name: 'a', dims: [3], type: GgmlType.F32, data: new Uint8Array(Float32Array.of(1, 2, 3).buffer) },
      { name: 'b', dims: [2, 2], type: GgmlType.F16, data: new Uint8Array(Uint16Array.of(f16(1), f16(-2), f16(0.5), f16(4)).buffer) },
    ];
    for (const version of [1, 2, 3]) {
      const f = parseGguf(concat(serializeGguf(kvs, tensors, version, 64)), `v${version}.gguf`);
      expect(f.version).toBe(version);
      expect(f.alignment).toBe(64);
      const val = (k: string) => f.metadata.get(k)!.value;
      expect([val('u8'), val('i8'), val('u16'), val('i16'), val('u32'), val('i32'), val('f32'), val('bool')])
        .toEqual([200, -100, 60000, -30000, 4_000_000_000, -2_000_000_000, 0.5, true]);
      expect([val('str'), val('u64'), val('i64'), val('f64')]).toEqual(['héllo ▁', 2n ** 40n, -(2n ** 40n), 0.1]);
      expect([...(val('arr.f32') as Float32Array)]).toEqual([1, 2.5]);
      expect(val('arr.str')).toEqual(['a', '', '▁b']);
      expect(val('arr.bool')).toEqual([true, false]);
      expect([...(val('arr.i32') as Int32Array)]).toEqual([-1, 7]);
      expect(f.tensors.get('b')!.dims).toEqual([2, 2]);
      expect(f.tensors.get('b')!.fileOffset % 64).toBe(0);
      expect([...dequantize(GgmlType.F16, f.tensors.get('b')!.read(), 4, 'b')]).toEqual([1, -2, 0.5, 4]);
      expect([...dequantize(GgmlType.F32, f.tensors.get('a')!.read(), 3, 'a')]).toEqual([1, 2, 3]);
    }
  });

  it('dequantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16 blocks built from the documented layouts', () => {
    const d = 0.125, m = -1.5;
    const q = Array.from({ length: 32 }, (_, j) => (j * 7 + 3) % 32); // 5-bit values, every one used
    const block = (head: number[], body: number[]) => {
      const b = new Uint8Array(head.length * 2 + body.length);
      const dv = new DataView(b.buffer);
      head.forEach((h, i) => dv.setUint16(2 * i, f16(h), true));
      b.set(body, head.length * 2);
      return b;
    };
    const nibbles = (v: number[]) => Array.from({ length: 16 }, (_, j) => (v[j] & 15) | ((v[j + 16] & 15) << 4));
    const qh = (v: number[]) => {
      let h = 0;
      v.forEach((x, j) => { h |= ((x >> 4) & 1) << j; });
      return [h & 255, (h >>> 8) & 255, (h >>> 16) & 255, h >>> 24];
    };
    const q4 = q.map((x) => x & 15);
    const cases: [number, Uint8Array, number[]][] = [
      [GgmlType.Q4_0, block([d], nibbles(q4)), q4.map((x) => (x - 8) * d)],
      [GgmlType.Q4_1, block([d, m], nibbles(q4)), q4.map((x) => x * d + m)],
      [GgmlType.Q5_0, block([d], [...qh(q), ...nibbles(q)]), q.map((x) => (x - 16) * d)],
      [GgmlType.Q5_1, block([d, m], [...qh(q), ...nibbles(q)]), q.map((x) => x * d + m)],
      [GgmlType.Q8_0, block([d], q.map((x) => (x * 5 - 80) & 255)), q.map((x) => (x * 5 - 80) * d)],
    ];
    for (const [type, bytes, expected] of cases) {
      const two = new Uint8Array(bytes.length * 2);
      two.set(bytes); two.set(bytes, bytes.length);
      expect([...dequantize(type, two, 64, `type ${type}`)], `type ${type}`).toEqual([...expected, ...expected]);
    }
    const bf = new Uint8Array(Uint16Array.of(0x3fc0, 0xc000).buffer);
    expect([...dequantize(GgmlType.BF16, bf, 2, 'bf')]).toEqual([1.5, -2]);
  });

  it('bad files name the file, tensor and expectation', () => {
    const good: GgufWriteKV[] = [['general.architecture', T.STRING, 'llama']];
    const msg = (bytes: Uint8Array, name = 'bad.gguf', llama = false) => {
      try {
        const f = parseGguf(bytes, name);
        if (llama) ggufToLlama(f);
      } catch (e) { expect(e).toBeInstanceOf(QaloraError); return (e as Error).message; }
      throw new Error('no error');
    };
    expect(msg(new Uint8Array(Buffer.from('GGML....')))).toMatch(/bad\.gguf: not a GGUF file/);
    const v9 = concat(serializeGguf(good, [], 3)); v9[4] = 9;
    expect(msg(v9)).toMatch(/GGUF version 9 is not supported/);
    const t = [{ name: 'w', dims: [32, 2], type: GgmlType.F32, data: new Uint8Array(256) }];
    const full = concat(serializeGguf(good, t));
    expect(msg(full.subarray(0, full.length - 10), 'cut.gguf')).toMatch(/cut\.gguf: tensor 'w': F32 \[32,2\] needs 256 bytes/);
    expect(msg(full.subarray(0, 30), 'head.gguf')).toMatch(/head\.gguf: truncated GGUF while reading/);
    // Q4_K is listed (so metadata-only reads work) but reading it names the type
    const k = concat(serializeGguf(good, [{ name: 'k', dims: [256], type: GgmlType.F32, data: new Uint8Array(1024) }]));
    const f = parseGguf(k, 'k.gguf');
    expect(() => dequantize(12, f.tensors.get('k')!.read(), 256, "k.gguf: tensor 'k'")).toThrow(/k\.gguf: tensor 'k': unsupported ggml tensor type Q4_K/);
    // a llama whose tensors are missing or misshapen
    const meta: GgufWriteKV[] = [
      ...good, ['llama.embedding_length', T.U32, 32], ['llama.feed_forward_length', T.U32, 64], ['llama.block_count', T.U32, 1],
      ['llama.attention.head_count', T.U32, 4], ['llama.context_length', T.U32, 16],
    ];
    const emb = { name: 'token_embd.weight', dims: [32, 10], type: GgmlType.F32, data: new Uint8Array(32 * 10 * 4) };
    expect(msg(concat(serializeGguf(meta, [emb])), 'm.gguf', true)).toMatch(/m\.gguf: missing tensor 'blk\.0\.attn_q\.weight' \(expected dims \[32,32\]\)/);
    const wrongQ = { name: 'blk.0.attn_q.weight', dims: [32, 16], type: GgmlType.F32, data: new Uint8Array(32 * 16 * 4) };
    expect(msg(concat(serializeGguf(meta, [emb, wrongQ])), 's.gguf', true)).toMatch(/s\.gguf: tensor 'blk\.0\.attn_q\.weight' has dims \[32,16\], expected \[32,32\]/);
    expect(msg(concat(serializeGguf([['general.architecture', T.STRING, 'gpt2']], [])), 'a.gguf', true)).toMatch(/architecture is 'gpt2'/);
    expect(msg(concat(serializeGguf(good, [])), 'n.gguf', true)).toMatch(/n\.gguf: missing GGUF metadata 'llama\.embedding_length'/);
  });
});

describe('GGUF quantized projections kept as QA-LoRA bases', () => {
  it('Q4_0, Q4_1 and Q8_0 map exactly onto (q, α, β) with group 32; Q5_1 stays float', async () => {
    const { blocksToQuantLinear } = await import('../runtime/formats/ggml-blocks.ts');
    const { unpackQ, wordsPerRow } = await import('../runtime/reference/numeric.ts');
    let seed = 12345;
    const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed / 2 ** 32; };
    const out = 8, inF = 64;
    const block = (type: number) => {
      const bb = { [GgmlType.Q4_0]: 18, [GgmlType.Q4_1]: 20, [GgmlType.Q8_0]: 34, [GgmlType.Q5_1]: 24 }[type]!;
      const b = new Uint8Array(bb);
      for (let i = 0; i < bb; i++) b[i] = Math.floor(rnd() * 256);
      const dv = new DataView(b.buffer);
      dv.setUint16(0, f32ToF16Bits(0.01 + rnd() * 0.1), true);
      if (type === GgmlType.Q4_1 || type === GgmlType.Q5_1) dv.setUint16(2, f32ToF16Bits(-rnd()), true);
      return b;
    };
    for (const type of [GgmlType.Q4_0, GgmlType.Q4_1, GgmlType.Q8_0, GgmlType.Q5_1]) {
      const data = new Uint8Array(Buffer.concat(Array.from({ length: out * inF / 32 }, () => block(type))));
      const lin = blocksToQuantLinear(type, data, out, inF, { rank: 4 });
      const ref = dequantize(type, data, out * inF, 'w');
      if (type === GgmlType.Q5_1) { expect(lin).toBeNull(); continue; }
      expect(lin!.settings).toMatchObject({ bits: type === GgmlType.Q8_0 ? 8 : 4, group: 32, rank: 4 });
      // the base reproduces ggml's values exactly (fp32 α·q + β, as the kernels compute it)
      const bits = lin!.settings.bits, wpr = wordsPerRow(inF, bits);
      let bad = 0;
      for (let i = 0; i < out * inF; i++) {
        const o = Math.floor(i / inF), k = o * (inF / 32) + Math.floor((i % inF) / 32);
        const q = unpackQ(lin!.qweight, o * wpr, i % inF, bits);
        if (Math.fround(Math.fround(lin!.alpha[k] * q) + lin!.beta[k]) !== ref[i]) bad++;
      }
      expect(bad, `type ${type}`).toBe(0);
      // a whole file: the projection stored in this type is kept quantized, the F32 ones stay float
      const dim = inF, kv = 32;
      const f32 = (n: number) => new Uint8Array(new Float32Array(n).fill(0.5).buffer);
      const ts: GgufWriteTensor[] = [
        { name: 'token_embd.weight', dims: [dim, 4], type: GgmlType.F32, data: f32(4 * dim) },
        { name: 'output_norm.weight', dims: [dim], type: GgmlType.F32, data: f32(dim) },
        { name: 'blk.0.attn_norm.weight', dims: [dim], type: GgmlType.F32, data: f32(dim) },
        { name: 'blk.0.ffn_norm.weight', dims: [dim], type: GgmlType.F32, data: f32(dim) },
        { name: 'blk.0.attn_q.weight', dims: [dim, dim], type, data: new Uint8Array(Buffer.concat(Array.from({ length: dim * dim / 32 }, () => block(type)))) },
        { name: 'blk.0.attn_k.weight', dims: [dim, kv], type: GgmlType.F32, data: f32(kv * dim) },
        { name: 'blk.0.attn_v.weight', dims: [dim, kv], type: GgmlType.F32, data: f32(kv * dim) },
        { name: 'blk.0.attn_output.weight', dims: [dim, dim], type: GgmlType.F32, data: f32(dim * dim) },
        { name: 'blk.0.ffn_gate.weight', dims: [dim, 32], type: GgmlType.F32, data: f32(32 * dim) },
        { name: 'blk.0.ffn_up.weight', dims: [dim, 32], type: GgmlType.F32, data: f32(32 * dim) },
        { name: 'blk.0.ffn_down.weight', dims: [32, dim], type: GgmlType.F32, data: f32(32 * dim) },
      ];
      const meta: GgufWriteKV[] = [
        ['general.architecture', T.STRING, 'llama'], ['llama.embedding_length', T.U32, dim], ['llama.feed_forward_length', T.U32, 32],
        ['llama.block_count', T.U32, 1], ['llama.attention.head_count', T.U32, 4], ['llama.attention.head_count_kv', T.U32, 2],
        ['llama.context_length', T.U32, 16],
      ];
      const file = parseGguf(concat(serializeGguf(meta, ts)), 'q.gguf');
      // every projection stays in the file; the one stored in this type offers its blocks as a base
      const loaded = ggufToLlama(file);
      const q = loaded.blocks[0].proj.q, k = loaded.blocks[0].proj.k;
      expect(q.kind === 'file' && q.quant && [q.quant.bits, q.quant.group]).toEqual([type === GgmlType.Q8_0 ? 8 : 4, 32]);
      expect(k.kind === 'file' && k.quant).toBeUndefined();
      if (q.kind === 'file') expect(Array.from(q.quant!.read({}).qweight)).toEqual(Array.from(blocksToQuantLinear(type, file.tensors.get('blk.0.attn_q.weight')!.read(), dim, dim)!.qweight));
    }
  });
});
