// Token tables kept in their file's half type (issue "real-size models", item 3): a GGUF or HF checkpoint's F16/BF16
// embedding and classifier stay fp16/bf16 bits (HalfTable) in every command. The core ops that read them —
// gemm_half (the classifier, forward and backward) and embedding_forward_half — give exactly what the fp32 ops give
// on the widened table (widening is exact and the engine is the same); the model's logits and gradients equal
// those of the widened model bit for bit; the GGUF export writes the tables back byte-identical; base files keep them.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildGguf, vocabFromTokenizer } from '../runtime/export/gguf.ts';
import { GgmlType } from '../runtime/formats/ggml-types.ts';
import { parseGguf, readGguf, serializeGguf, type GgufWriteKV, type GgufWriteTensor } from '../runtime/formats/gguf.ts';
import { ggufToLlama } from '../runtime/formats/gguf-llama.ts';
import { loadQuantizedBase, saveQuantizedBase } from '../runtime/model/basefile.ts';
import { denseTable, readAllFloat } from '../runtime/model/dense.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import type { CoreOps } from '../runtime/model/native-ops.ts';
import { openModel } from '../runtime/model/open.ts';
import type { HalfTable, LlamaWeights } from '../runtime/model/types.ts';
import { loadCore } from '../runtime/native.ts';
import { uniformStream } from '../runtime/random.ts';
import { bf16ToF32Array, f16ToF32Array, f32ToBf16Bits, f32ToF16Bits } from '../runtime/safetensors.ts';
import type { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { loadSpec } from '../dsl/index.ts';
import { fixture, repoRoot } from './fixtures.ts';
import { STORIES, TOK } from './train-fixture.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-half-tables-'));
const concat = (chunks: Uint8Array[]) => new Uint8Array(Buffer.concat(chunks));
const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

function randomF32(n: number, seed: number): Float32Array {
  const u = uniformStream(seed);
  return Float32Array.from({ length: n }, () => u() * 2 - 1);
}
const toHalf = (a: Float32Array, dtype: 'fp16' | 'bf16') => Uint16Array.from(a, dtype === 'bf16' ? f32ToBf16Bits : f32ToF16Bits);
const widen = (h: Uint16Array, dtype: 'fp16' | 'bf16') => (dtype === 'bf16' ? bf16ToF32Array(h) : f16ToF32Array(h));

describe('core ops on half tables: exactly the fp32 ops on the widened table', () => {
  let core: CoreOps;
  beforeAll(async () => {
    core = (await loadCore()).core as unknown as CoreOps;
  });
  for (const dtype of ['fp16', 'bf16'] as const) {
    // m: decode (the few-rows path), 16/17 around its edge, 70 (the packed GEMM); k = 45 leaves a tail of 5
    for (const m of [1, 3, 16, 17, 70]) {
      it(`gemm_half ${dtype} m=${m}: logits x·Wᵀ and backward dy·W, written and accumulated`, () => {
        const n = 37, k = 45;
        const w = toHalf(randomF32(n * k, 1 + m), dtype), wf = widen(w, dtype);
        const x = randomF32(m * k, 2 + m), dy = randomF32(m * n, 3 + m);
        const y = new Float32Array(m * n), yRef = new Float32Array(m * n);
        core.gemm_half(x, w, y, m, n, k, true, dtype === 'bf16', false);
        core.gemm(x, wf, yRef, m, n, k, false, true, false);
        expect(same(y, yRef)).toBe(true);
        const dx = randomF32(m * k, 4), dxRef = dx.slice();
        core.gemm_half(dy, w, dx, m, k, n, false, dtype === 'bf16', true);
        core.gemm(dy, wf, dxRef, m, k, n, false, false, true);
        expect(same(dx, dxRef)).toBe(true);
        // …and the half table was really read as such: fp16 and bf16 bits of the same values differ
        const other = new Float32Array(m * n);
        core.gemm_half(x, w, other, m, n, k, true, dtype !== 'bf16', false);
        expect(same(other, yRef)).toBe(false);
      });
    }
    it(`embedding_forward_half ${dtype}: the widened rows, zeros for ids outside the table`, () => {
      const vocab = 11, dim = 13;
      const t = toHalf(randomF32(vocab * dim, 9), dtype);
      const ids = Int32Array.from([3, 0, 10, 3, -1, 11]);
      const out = new Float32Array(ids.length * dim).fill(NaN), want = new Float32Array(ids.length * dim);
      core.embedding_forward_half(t, ids, out, ids.length, vocab, dim, dtype === 'bf16');
      core.embedding_forward(widen(t, dtype), ids, want, ids.length, vocab, dim);
      expect(same(out, want)).toBe(true);
      expect(Array.from(out.subarray(4 * dim))).toEqual(new Array(2 * dim).fill(0));
    });
  }
});

/** stories260K as a GGUF with its embedding and an untied classifier (the embedding negated) stored as `type`. */
async function halfGguf(type: number, name: string): Promise<string> {
  const opened = await openModel({ model: fixture(STORIES), tokenizer: fixture(TOK) });
  const float = parseGguf(concat(buildGguf(opened.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe)).chunks));
  const kvs: GgufWriteKV[] = [...float.metadata].filter(([k]) => k !== 'general.alignment').map(([k, kv]) => [k, kv.type, kv.value, kv.elemType]);
  const bits = (w: Float32Array) => new Uint8Array(Uint16Array.from(w, type === GgmlType.BF16 ? f32ToBf16Bits : f32ToF16Bits).buffer);
  const tensors: GgufWriteTensor[] = [];
  for (const t of float.tensors.values()) {
    if (t.name !== 'token_embd.weight') {
      tensors.push({ name: t.name, dims: t.dims, type: t.type, data: t.read() });
      continue;
    }
    const w = new Float32Array(t.read().slice().buffer);
    tensors.push({ name: t.name, dims: t.dims, type, data: bits(w) });
    tensors.push({ name: 'output.weight', dims: t.dims, type, data: bits(w.map((v) => -v)) });
  }
  const path = join(dir, name);
  writeFileSync(path, concat(serializeGguf(kvs, tensors)));
  return path;
}

const TOKENS = Int32Array.from([1, 403, 407, 261, 378, 263, 304, 341, 443, 30, 99, 250]);
const spec = loadSpec(join(repoRoot, 'specs/stories260k.qal')).spec!;

/** The same weights with both tables widened to fp32: the model a half table must reproduce bit for bit. */
function widened(w: LlamaWeights): LlamaWeights {
  return { ...w, tokEmbedding: denseTable(w.tokEmbedding), classifier: denseTable(w.classifier) };
}

describe('F16 / BF16 token tables in a GGUF file', () => {
  for (const [label, type] of [['F16', GgmlType.F16], ['BF16', GgmlType.BF16]] as const) {
    it(`${label}: kept as bits; logits and adapter gradients equal the widened model's; export writes them back byte-identical`, async () => {
      const path = await halfGguf(type, `half-${label}.gguf`);
      const w = readAllFloat(ggufToLlama(readGguf(path)));
      const emb = w.tokEmbedding as HalfTable, cls = w.classifier as HalfTable;
      expect(emb.kind).toBe('half');
      expect(cls.kind).toBe('half');
      expect(emb.dtype).toBe(type === GgmlType.BF16 ? 'bf16' : 'fp16');
      expect(emb.data).toBeInstanceOf(Uint16Array);
      expect(cls).not.toBe(emb);

      // quantized with adapters, so that training runs the classifier's backward (dx = dlogits·W) too
      const half = await LlamaModel.create(w, { backend: 'cpu', spec, seed: 5 });
      const twin = await LlamaModel.create(widened(w), { backend: 'cpu', spec, seed: 5 });
      const n = TOKENS.length - 1;
      expect(same(half.logits(TOKENS.subarray(0, n), 1, n), twin.logits(TOKENS.subarray(0, n), 1, n))).toBe(true);
      const a = half.lossAndGrad(TOKENS.subarray(0, n), TOKENS.subarray(1), 1, n), b = twin.lossAndGrad(TOKENS.subarray(0, n), TOKENS.subarray(1), 1, n);
      expect(a.loss).toBe(b.loss);
      expect(same(a.grads[0].q!.b, b.grads[0].q!.b)).toBe(true);
      expect(a.grads[0].q!.b.some((v) => v !== 0)).toBe(true);

      // export: the tables go back as the input's bytes
      const out = parseGguf(concat(buildGguf(w, vocabFromTokenizer((await openModel({ model: path })).tokenizer as SentencePieceBpe)).chunks));
      const input = readGguf(path);
      for (const name of ['token_embd.weight', 'output.weight']) {
        expect(out.tensors.get(name)!.type).toBe(type);
        expect(Buffer.from(out.tensors.get(name)!.read()).equals(Buffer.from(input.tensors.get(name)!.read()))).toBe(true);
      }

      // base files keep them too
      const base = join(dir, `half-${label}.base.safetensors`);
      saveQuantizedBase(base, w);
      const back = loadQuantizedBase(base).weights;
      expect((back.tokEmbedding as HalfTable).kind).toBe('half');
      expect(Buffer.from((back.classifier as HalfTable).data.buffer).equals(Buffer.from(cls.data.buffer))).toBe(true);
    });
  }
});

describe('half token tables on a GPU backend (emu)', () => {
  it('are widened to fp32 on upload: logits equal the CPU half model\'s within the GPU kernels\' rounding', async () => {
    const w = readAllFloat(ggufToLlama(readGguf(await halfGguf(GgmlType.F16, 'half-emu.gguf'))));
    const n = TOKENS.length;
    const cpu = (await LlamaModel.create(w, { backend: 'cpu', spec, seed: 5 })).logits(TOKENS, 1, n);
    const emu = (await LlamaModel.create(w, { backend: 'emu', spec, seed: 5 })).logits(TOKENS, 1, n);
    let d = 0, m = 0;
    for (let i = 0; i < cpu.length; i++) { d = Math.max(d, Math.abs(cpu[i] - emu[i])); m = Math.max(m, Math.abs(cpu[i])); }
    expect(d / m).toBeLessThan(1e-4);
  });
});
