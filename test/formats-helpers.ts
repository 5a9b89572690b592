// Helpers shared by the format tests.
import { expect } from 'vitest';
import { denseTable, denseWeight } from '../runtime/model/dense.ts';
import type { LlamaWeights, LoadedLinear, QuantLinear } from '../runtime/model/types.ts';

/** A loaded projection as the QA-LoRA base its file holds (FileLinear.quant, default settings), or itself. */
export function quantOf(lin: LoadedLinear): QuantLinear {
  if (lin.kind === 'quant') return lin;
  if (lin.kind === 'file' && lin.quant) return lin.quant.read({});
  throw new Error(`${lin.kind === 'file' ? lin.source : 'float layer'} is not quantized`);
}

/** A loaded projection's W in fp32: read from the file (FileLinear), or dequantized. */
export function floatOf(lin: LoadedLinear): Float32Array {
  return lin.kind === 'file' ? lin.readFloat() : denseWeight(lin);
}

/** Bit-for-bit equality of float arrays (fast: vitest's deep equality is slow on large typed arrays). */
export function sameBits(a: Float32Array, b: Float32Array, what: string): void {
  const bytes = (x: Float32Array) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  expect(a.length, what).toBe(b.length);
  expect(bytes(a).equals(bytes(b)), what).toBe(true);
}

export function expectSameWeights(a: LlamaWeights<LoadedLinear>, b: LlamaWeights<LoadedLinear>): void {
  expect(b.config).toEqual(a.config);
  sameBits(denseTable(a.tokEmbedding), denseTable(b.tokEmbedding), 'tokEmbedding');
  sameBits(a.finalNorm, b.finalNorm, 'finalNorm');
  sameBits(denseTable(a.classifier), denseTable(b.classifier), 'classifier');
  a.blocks.forEach((blk, l) => {
    sameBits(blk.attnNorm, b.blocks[l].attnNorm, `block ${l} attnNorm`);
    sameBits(blk.ffnNorm, b.blocks[l].ffnNorm, `block ${l} ffnNorm`);
    for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
      expect([b.blocks[l].proj[p].out, b.blocks[l].proj[p].in]).toEqual([blk.proj[p].out, blk.proj[p].in]);
      sameBits(floatOf(blk.proj[p]), floatOf(b.blocks[l].proj[p]), `block ${l} ${p}`);
    }
  });
}

