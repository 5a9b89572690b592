import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { parseLlama2c, readLlama2c, serializeLlama2cV1 } from '../runtime/formats/llama2c.ts';
import { denseTable } from '../runtime/model/dense.ts';
import type { LlamaWeights, LoadedLinear } from '../runtime/model/types.ts';
import { expectSameWeights, floatOf, sameBits } from './formats-helpers.ts';
import { fixture, needs } from './fixtures.ts';

const STORIES = 'models/stories260K/stories260K.bin';
const AIDREAMS = 'models/aidreams260K/aidreams260K.bin';
const dir = mkdtempSync(join(tmpdir(), 'qalora-l2c-'));

describe('llama2.c checkpoints', () => {
  it('reads stories260K v0: header, shapes and values at independently computed offsets', () => {
    const raw = readFileSync(fixture(STORIES));
    const w = readLlama2c(fixture(STORIES));
    expect(w.config).toEqual({
      dim: 64, hidden: 172, layers: 5, heads: 8, kvHeads: 4, vocab: 512, context: 512,
      ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true,
    });
    expect(w.classifier).toBe(w.tokEmbedding);
    const [D, H, L, V, KV] = [64, 172, 5, 512, 32];
    const f = (floatIndex: number) => raw.readFloatLE(28 + 4 * floatIndex);
    // v0 order: emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final
    const offs = { emb: 0, att: V * D } as Record<string, number>;
    offs.wq = offs.att + L * D;
    offs.wk = offs.wq + L * D * D;
    offs.wv = offs.wk + L * KV * D;
    offs.wo = offs.wv + L * KV * D;
    offs.ffn = offs.wo + L * D * D;
    offs.w1 = offs.ffn + L * D;
    offs.w2 = offs.w1 + L * H * D;
    offs.w3 = offs.w2 + L * D * H;
    offs.fin = offs.w3 + L * H * D;
    expect(denseTable(w.tokEmbedding)[V * D - 1]).toBe(f(V * D - 1));
    const b3 = w.blocks[3];
    expect(b3.attnNorm[7]).toBe(f(offs.att + 3 * D + 7));
    expect(b3.proj.q.out).toBe(D);
    expect(floatOf(b3.proj.q)[5 * D + 9]).toBe(f(offs.wq + 3 * D * D + 5 * D + 9));
    expect(b3.proj.k.out).toBe(KV);
    expect(floatOf(b3.proj.k)[KV * D - 1]).toBe(f(offs.wk + 4 * KV * D - 1));
    expect(floatOf(b3.proj.v)[0]).toBe(f(offs.wv + 3 * KV * D));
    expect(floatOf(b3.proj.o)[11]).toBe(f(offs.wo + 3 * D * D + 11));
    expect(b3.ffnNorm[0]).toBe(f(offs.ffn + 3 * D));
    expect([b3.proj.gate.out, b3.proj.gate.in, b3.proj.down.out, b3.proj.down.in]).toEqual([H, D, D, H]);
    expect(floatOf(b3.proj.gate)[100]).toBe(f(offs.w1 + 3 * H * D + 100));
    expect(floatOf(b3.proj.down)[100]).toBe(f(offs.w2 + 3 * D * H + 100));
    expect(floatOf(b3.proj.up)[100]).toBe(f(offs.w3 + 3 * H * D + 100));
    expect(w.finalNorm[63]).toBe(f(offs.fin + 63));
    // what follows is exactly the legacy RoPE table: seq_len · head_size floats
    expect(raw.length).toBe(28 + 4 * (offs.fin + D + 512 * (D / 8)));
  });

  it('reads aidreams260K (a second model: nothing hard-coded)', needs(AIDREAMS), () => {
    const w = readLlama2c(fixture(AIDREAMS));
    expect(w.config).toMatchObject({ dim: 64, hidden: 172, layers: 4, heads: 4, kvHeads: 4, vocab: 512, context: 128 });
    expect(w.blocks).toHaveLength(4);
    expect(w.blocks[0].proj.k.out).toBe(64);
  });

  it('v1 ("ak42", norms first) round-trips to the same weights, tied and untied', () => {
    const w = readLlama2c(fixture(STORIES));
    const v1 = serializeLlama2cV1(w);
    expect(v1.readUInt32LE(0)).toBe(0x616b3432);
    expectSameWeights(w, parseLlama2c(v1, 'v1.bin'));
    const untied: LlamaWeights<LoadedLinear> = {
      ...w,
      config: { ...w.config, tiedClassifier: false },
      classifier: denseTable(w.tokEmbedding).map((x) => -x),
    };
    const back = parseLlama2c(serializeLlama2cV1(untied), 'untied.bin');
    expect(back.classifier).not.toBe(back.tokEmbedding);
    expectSameWeights(untied, back);
  });

  it('v0 with a negative vocab_size has a separate classifier after the RoPE table', () => {
    const raw = readFileSync(fixture(STORIES));
    const w = readLlama2c(fixture(STORIES));
    const cls = new Float32Array(512 * 64).map((_, i) => i / 1000);
    const bytes = Buffer.concat([raw, Buffer.from(cls.buffer)]);
    bytes.writeInt32LE(-512, 20);
    const u = parseLlama2c(bytes, 'untied-v0.bin');
    expect(u.config.tiedClassifier).toBe(false);
    sameBits(denseTable(u.classifier), cls, 'classifier');
    sameBits(denseTable(u.tokEmbedding), denseTable(w.tokEmbedding), 'tokEmbedding');
  });

  it('bad files: truncated, trailing bytes, bad header, unsupported version — each named', () => {
    const raw = readFileSync(fixture(STORIES));
    const msg = (buf: Buffer, name: string) => {
      try { parseLlama2c(buf, name); } catch (e) { expect(e).toBeInstanceOf(QaloraError); return (e as Error).message; }
      throw new Error('no error');
    };
    expect(msg(raw.subarray(0, 200_000), 'cut.bin')).toMatch(/cut\.bin: tensor wq\[\d\]: F32 \[64,64\] needs \d+ bytes at offset \d+, file has 200000 \(truncated\?\)/);
    expect(msg(raw.subarray(0, 20), 'tiny.bin')).toMatch(/tiny\.bin: too short/);
    expect(msg(Buffer.concat([raw, Buffer.alloc(4)]), 'extra.bin')).toMatch(/extra\.bin: 4 bytes left after the last tensor/);
    const badHeads = Buffer.from(raw); badHeads.writeInt32LE(7, 12);
    expect(msg(badHeads, 'heads.bin')).toMatch(/heads\.bin: not a llama2\.c checkpoint \(dim 64 is not a multiple of n_heads 7/);
    const v2 = Buffer.alloc(256); v2.writeUInt32LE(0x616b3432, 0); v2.writeInt32LE(2, 4);
    expect(msg(v2, 'q8.bin')).toMatch(/q8\.bin: llama2\.c checkpoint version 2 is not supported/);
    const path = join(dir, 'nope.bin');
    writeFileSync(path, Buffer.from('GGUF'));
    expect(() => readLlama2c(path)).toThrow(/nope\.bin: too short/);
  });
});
