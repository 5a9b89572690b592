// Helpers shared by the format tests.
import { expect } from 'vitest';
import type { FloatLinear, LlamaWeights } from '../runtime/model/types.ts';

/** Bit-for-bit equality of float arrays (fast: vitest's deep equality is slow on large typed arrays). */
export function sameBits(a: Float32Array, b: Float32Array, what: string): void {
  const bytes = (x: Float32Array) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  expect(a.length, what).toBe(b.length);
  expect(bytes(a).equals(bytes(b)), what).toBe(true);
}

export function expectSameWeights(a: LlamaWeights, b: LlamaWeights): void {
  expect(b.config).toEqual(a.config);
  sameBits(a.tokEmbedding, b.tokEmbedding, 'tokEmbedding');
  sameBits(a.finalNorm, b.finalNorm, 'finalNorm');
  sameBits(a.classifier, b.classifier, 'classifier');
  a.blocks.forEach((blk, l) => {
    sameBits(blk.attnNorm, b.blocks[l].attnNorm, `block ${l} attnNorm`);
    sameBits(blk.ffnNorm, b.blocks[l].ffnNorm, `block ${l} ffnNorm`);
    for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
      expect([b.blocks[l].proj[p].out, b.blocks[l].proj[p].in]).toEqual([blk.proj[p].out, blk.proj[p].in]);
      sameBits((blk.proj[p] as FloatLinear).w, (b.blocks[l].proj[p] as FloatLinear).w, `block ${l} ${p}`);
    }
  });
}

