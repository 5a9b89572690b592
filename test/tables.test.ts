// Token tables in the type a spec names (issue "real-size models", item 3): `tables fp16`, `tables { embedding q8_0
// classifier fp16 }`. The block types are quantized as llama.cpp's own quantizer does — checked byte for byte
// against quantize_row_*_ref of the ggml library node-llama-cpp ships — and a model with `tables q8_0` runs exactly
// like the same checkpoint stored with Q8_0 tables; the GGUF export writes those blocks; a tied table takes one type.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseSpec } from '../dsl/index.ts';
import type { ResolvedSpec, TableType } from '../dsl/resolved.ts';
import { buildGguf, vocabFromTokenizer } from '../runtime/export/gguf.ts';
import { blocksToQuantLinear } from '../runtime/formats/ggml-blocks.ts';
import { quantizeGgml } from '../runtime/formats/ggml-quantize.ts';
import { GgmlType, dequantize } from '../runtime/formats/ggml-types.ts';
import { parseGguf } from '../runtime/formats/gguf.ts';
import { denseTable } from '../runtime/model/dense.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { openModel } from '../runtime/model/open.ts';
import { tableAs, tableTypeOf, withTableTypes } from '../runtime/model/tables.ts';
import type { LlamaWeights, TokenTable } from '../runtime/model/types.ts';
import { uniformStream } from '../runtime/random.ts';
import { resolveTrainConfig } from '../runtime/train/config.ts';
import { f32ToBf16Bits, f32ToF16Bits } from '../runtime/safetensors.ts';
import type { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { fixture, repoRoot } from './fixtures.ts';
import { STORIES, TOK } from './train-fixture.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-tables-'));
const BLOCKS = { q8_0: GgmlType.Q8_0, q4_1: GgmlType.Q4_1, q4_0: GgmlType.Q4_0 } as const;
const bytesOf = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

function randomF32(n: number, seed: number, scale = 1): Float32Array {
  const u = uniformStream(seed);
  return Float32Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

describe('the `tables` key', () => {
  const model = (tables: string, dim = 64) => `model m {
  llama { dim ${dim}  hidden 128  layers 2  heads 4  vocab 512  context 64 }
  qalora { rank 2 }
  ${tables}
  target cpu
}`;
  const parse = (tables: string, dim?: number) => parseSpec(model(tables, dim), 'm.qal');
  it('one type for both tables, or one per table; absent means the file\'s own', () => {
    expect(parse('tables fp16').spec!.tables).toEqual({ embedding: 'fp16', classifier: 'fp16' });
    expect(parse('tables { embedding q8_0  classifier bf16 }').spec!.tables).toEqual({ embedding: 'q8_0', classifier: 'bf16' });
    expect(parse('tables { classifier q4_1 }').spec!.tables).toEqual({ embedding: 'file', classifier: 'q4_1' });
    expect(parse('').spec!.tables).toBeUndefined();
  });
  it('bad types and places are reported where they are written', () => {
    const diag = (text: string, dim?: number) => parse(text, dim).diagnostics.map((d) => `${d.line}:${d.col} ${d.message}`);
    expect(diag('tables q5_1')).toEqual(['4:10 table type `q5_1` is not supported']);
    expect(parse('tables q5_1').diagnostics[0].hint).toBe('did you mean `q4_1`?');
    expect(parse('tables zzz').diagnostics[0].hint).toMatch(/file, fp32, fp16, bf16, q8_0, q4_1, q4_0/);
    expect(diag('tables')).toEqual(['4:3 `tables` needs a type (one of file, fp32, fp16, bf16, q8_0, q4_1, q4_0) or a `{ … }` block']);
    expect(diag('tables fp16 { embedding fp32 }')).toEqual(['4:15 `tables` takes one type for both tables or a `{ … }` block, not both']);
    expect(diag('tables { embeding fp16 }')).toEqual(['4:12 unknown key `embeding` in `tables`']);
    expect(parse('tables { embeding fp16 }').diagnostics[0].hint).toBe('did you mean `embedding`?');
    // ggml blocks run along a row of dim values: one error at the setting, not one per table
    expect(diag('tables q8_0', 48)).toEqual(['4:10 q8_0 stores blocks of 32 values along each row, but the table\'s rows are dim = 48 long']);
    expect(diag('tables { embedding fp16  classifier q4_0 }', 48)).toEqual(['4:39 q4_0 stores blocks of 32 values along each row, but the table\'s rows are dim = 48 long']);
    const inSpec = parseSpec('spec s {\n  tables fp16\n  layer a { in 64 out 64  rank 2 }\n}', 's.qal').diagnostics;
    expect(inSpec.map((d) => `${d.line}:${d.col} ${d.message}`)).toEqual(['2:3 `tables` does not belong in `spec s`']);
  });
});

// The library node-llama-cpp loads: llama.cpp's own quantize_row_{q4_0,q4_1,q8_0}_ref, called through a small C harness.
const ggmlLib = join(repoRoot, 'node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so');
function llamaCppBlocks(type: keyof typeof BLOCKS, x: Float32Array): Uint8Array {
  const exe = join(dir, 'ggml-quantize');
  if (!existsSync(exe)) {
    writeFileSync(`${exe}.c`, `#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
int main(int argc, char **argv) {
  void *lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "%s\\n", dlerror()); return 1; }
  char sym[64];
  snprintf(sym, sizeof sym, "quantize_row_%s_ref", argv[2]);
  void (*quantize)(const float *, void *, int64_t) = (void (*)(const float *, void *, int64_t))dlsym(lib, sym);
  if (!quantize) { fprintf(stderr, "no %s\\n", sym); return 1; }
  long n = atol(argv[3]), bytes = atol(argv[4]);
  float *x = malloc(n * sizeof(float));
  void *y = malloc(bytes);
  if (fread(x, sizeof(float), n, stdin) != (size_t)n) return 2;
  quantize(x, y, n);
  fwrite(y, 1, bytes, stdout);
  return 0;
}
`);
    execFileSync('cc', ['-O1', '-o', exe, `${exe}.c`, '-ldl']);
  }
  const bytes = (x.length / 32) * ({ q8_0: 34, q4_1: 20, q4_0: 18 } as const)[type];
  return new Uint8Array(execFileSync(exe, [ggmlLib, type, String(x.length), String(bytes)], { input: bytesOf(x), maxBuffer: 1 << 26 }));
}

describe('ggml blocks: quantizeGgml writes what llama.cpp\'s quantizer writes', () => {
  beforeAll(() => {
    if (!existsSync(ggmlLib)) throw new Error(`${ggmlLib} is missing: npm ci installs it with node-llama-cpp`);
  });
  // Blocks that probe the rounding rules: halves (roundf takes them away from zero), an all-zero block (d = 0),
  // one value of either sign largest (Q4_0's signed max), a constant block, and a wide dynamic range.
  const probes = new Float32Array(32 * 6);
  for (let j = 0; j < 32; j++) {
    probes[j] = j === 0 ? 127 : (j % 2 ? -1 : 1) * (j + 0.5);
    probes[64 + j] = j === 5 ? -3 : 0.25 * (j % 7);
    probes[96 + j] = j === 9 ? 2 : -0.1 * (j % 5);
    probes[128 + j] = 0.375;
    probes[160 + j] = (j % 2 ? -1 : 1) * 2 ** (j - 16);
  }
  // A Q4_0 block where one fused multiply-add in place of `x·id + 8.5` would change nibbles: each value sits a few
  // fp32 ulps from a rounding boundary, where x·id (of a finer binade than the sum) rounds across it. The library
  // does not fuse, and neither may we. (Q4_1's `(x − min)·id + 0.5` cannot tell the two apart: its sum is in the
  // product's binade or the next.)
  const fr = Math.fround, f32 = new Float32Array(1), i32 = new Int32Array(f32.buffer);
  const ulps = (v: number, n: number) => ((f32[0] = v), (i32[0] += n), f32[0]);
  function contractionProbe(): Float32Array {
    const x = new Float32Array(32);
    x[0] = 0.9; // d = −0.1125: id is not a power of two
    const d = fr(x[0] / -8), id = fr(1 / d);
    let sensitive = 0;
    for (let j = 1; j < 32; j++) {
      const base = fr(((j % 16) - 7.5) * d); // x·id + 8.5 = j mod 16 + 1, a nibble boundary
      x[j] = base;
      for (let n = -6; n <= 6; n++) {
        const v = ulps(base, n);
        if (Math.trunc(fr(fr(v * id) + 8.5)) !== Math.trunc(fr(v * id + 8.5))) {
          x[j] = v;
          sensitive++;
          break;
        }
      }
    }
    expect(sensitive).toBeGreaterThan(4);
    return x;
  }
  for (const type of Object.keys(BLOCKS) as Array<keyof typeof BLOCKS>) {
    it(`${type}: random rows at three scales and the rounding probes, byte for byte`, () => {
      const cases: Array<[Float32Array, string]> = [[randomF32(32 * 300, 7, 1), 'uniform'], [randomF32(32 * 40, 8, 1e-3), 'small'], [randomF32(32 * 40, 9, 3e4), 'large'], [probes, 'probes']];
      if (type === 'q4_0') cases.push([contractionProbe(), 'contraction probe']);
      for (const [x, what] of cases) {
        const ours = quantizeGgml(BLOCKS[type], x, x.length / 32, 32);
        expect(bytesOf(ours).equals(Buffer.from(llamaCppBlocks(type, x))), `${type} ${what}`).toBe(true);
      }
    });
  }
});

describe('tableAs: a table converted to the named type', () => {
  const vocab = 40, dim = 64, w = randomF32(vocab * dim, 3);
  it('half types hold the rounded bits; fp32 widens exactly; the same type is the same object', () => {
    for (const [type, round] of [['fp16', f32ToF16Bits], ['bf16', f32ToBf16Bits]] as const) {
      const t = tableAs(w, type, vocab, dim);
      expect(tableTypeOf(t)).toBe(type);
      expect(t).toMatchObject({ kind: 'half', dtype: type, out: vocab, in: dim });
      expect(Array.from((t as { data: Uint16Array }).data)).toEqual(Array.from(w, round));
      expect(tableAs(t, type, vocab, dim)).toBe(t);
      expect(tableAs(t, 'file', vocab, dim)).toBe(t);
      const back = tableAs(t, 'fp32', vocab, dim) as Float32Array;
      expect(bytesOf(back).equals(bytesOf(denseTable(t)))).toBe(true);
    }
  });
  for (const type of Object.keys(BLOCKS) as Array<keyof typeof BLOCKS>) {
    it(`${type}: the blocks, held exactly, dequantize to what ggml's blocks dequantize to`, () => {
      const t = tableAs(w, type, vocab, dim);
      expect(tableTypeOf(t)).toBe(type);
      const blocks = quantizeGgml(BLOCKS[type], w, vocab, dim);
      // as values: (q − 8)·d gives −0 where α·q + β gives +0
      const ours = denseTable(t), theirs = dequantize(BLOCKS[type], blocks, vocab * dim, type);
      expect(ours.every((v, i) => v === theirs[i])).toBe(true);
      expect(tableAs(t, type, vocab, dim)).toBe(t);
      // …and they are the blocks a GGUF file of that type would hand over
      const fromFile = blocksToQuantLinear(BLOCKS[type], blocks, vocab, dim, { scales: 'fp16' })!;
      expect(bytesOf((t as typeof fromFile).qweight).equals(bytesOf(fromFile.qweight))).toBe(true);
    });
  }
  it('a large table is converted a slice at a time, slices splitting rows, with the same result as at once', () => {
    // 4500 × 1024: two slices of rows for the half types; two 4 MiB slices of Q8_0 blocks, the first ending mid-row
    const V = 4500, D = 1024, big = randomF32(V * D, 21);
    const q = tableAs(big, 'q8_0', V, D) as ReturnType<typeof blocksToQuantLinear> & object;
    const whole = blocksToQuantLinear(BLOCKS.q8_0, quantizeGgml(BLOCKS.q8_0, big, V, D), V, D, { scales: 'fp16' })!;
    for (const k of ['qweight', 'alpha', 'beta'] as const) expect(bytesOf(q[k]).equals(bytesOf(whole[k])), k).toBe(true);
    const h = tableAs(q, 'bf16', V, D) as { data: Uint16Array };
    expect(bytesOf(h.data).equals(bytesOf(Uint16Array.from(denseTable(q), f32ToBf16Bits)))).toBe(true);
  });
  it('a tied table takes one type: two names are an error that says which to write', () => {
    const tied = { config: { vocab, dim }, tokEmbedding: w, classifier: w } as unknown as LlamaWeights;
    expect(() => withTableTypes(tied, { embedding: 'q8_0', classifier: 'fp16' })).toThrow(/ties its classifier to the token embedding.*embedding q8_0 and classifier fp16: write `tables q8_0`/);
    const one = withTableTypes(tied, { embedding: 'fp16', classifier: 'fp16' });
    expect(one.classifier).toBe(one.tokEmbedding);
    const untied = withTableTypes({ ...tied, classifier: w.map((v) => -v) }, { embedding: 'q8_0', classifier: 'bf16' });
    expect([tableTypeOf(untied.tokEmbedding), tableTypeOf(untied.classifier)]).toEqual(['q8_0', 'bf16']);
  });
});

describe('a model whose spec names its tables', () => {
  let weights: LlamaWeights;
  let spec: (tables: string) => ResolvedSpec;
  beforeAll(async () => {
    const opened = await openModel({ model: fixture(STORIES), tokenizer: fixture(TOK) });
    weights = opened.weights as LlamaWeights;
    spec = (tables: string) => {
      const r = parseSpec(`model stories260k_tables {
  llama { dim 64  hidden 172  layers 5  heads 8  kv_heads 4  vocab 512  context 512 }
  qalora { bits 4  group 32  rank 2  alpha 4  dtype fp32 }
  override down { group 43  rank 4  alpha 8 }
  ${tables}
  target cpu
}`, 'tables.qal');
      if (!r.spec) throw new Error(r.diagnostics.map((d) => d.message).join('; '));
      return r.spec;
    };
  });
  const ids = Int32Array.from([1, 403, 261, 50, 7, 300, 12, 90]);
  const logitsOf = async (w: LlamaWeights, s: ResolvedSpec, table?: TokenTable) =>
    (await LlamaModel.create(table ? { ...w, tokEmbedding: table, classifier: table } : w, { backend: 'cpu', spec: s, seed: 1 })).logits(ids, 1, ids.length);

  for (const type of ['q8_0', 'q4_1', 'fp16'] as const satisfies readonly TableType[]) {
    it(`tables ${type}: the table is held as ${type}, and runs exactly as a checkpoint that stores it so`, async () => {
      const s = spec(`tables ${type}`);
      const m = await LlamaModel.create(weights, { backend: 'cpu', spec: s, seed: 1 });
      expect(tableTypeOf(m.weights.tokEmbedding)).toBe(type);
      expect(m.weights.classifier).toBe(m.weights.tokEmbedding);
      const stored = tableAs(weights.tokEmbedding, type, 512, 64);
      const got = m.logits(ids, 1, ids.length), want = await logitsOf(weights, spec(''), stored);
      expect(bytesOf(got).equals(bytesOf(want))).toBe(true);
      // Near the fp32 model, but not it: the table really changed.
      const fp32 = await logitsOf(weights, spec(''));
      expect(bytesOf(got).equals(bytesOf(fp32))).toBe(false);
      let err = 0;
      for (let i = 0; i < got.length; i++) err = Math.max(err, Math.abs(got[i] - fp32[i]));
      expect(err).toBeLessThan(type === 'q4_1' ? 1.5 : 0.2);
    });
  }

  it('on a GPU backend (emu) a q8_0 table runs through the device\'s rank-0 kernels: logits equal the CPU\'s within 1e-4', async () => {
    const s = spec('tables q8_0');
    const cpu = (await LlamaModel.create(weights, { backend: 'cpu', spec: s, seed: 1 })).logits(ids, 1, ids.length);
    const emuModel = await LlamaModel.create(weights, { backend: 'emu', spec: s, seed: 1 });
    expect(tableTypeOf(emuModel.weights.classifier)).toBe('q8_0');
    const emu = emuModel.logits(ids, 1, ids.length);
    let d = 0, m = 0;
    for (let i = 0; i < cpu.length; i++) { d = Math.max(d, Math.abs(cpu[i] - emu[i])); m = Math.max(m, Math.abs(cpu[i])); }
    expect(d / m).toBeLessThan(1e-4);
  });

  it('--tables (CreateOptions.tables) names one type for both tables, over the spec\'s; a train config checks it', async () => {
    const opened = await openModel({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: spec('tables q8_0'), tables: 'bf16' });
    expect(tableTypeOf(opened.weights.tokEmbedding)).toBe('bf16');
    expect(opened.weights.classifier).toBe(opened.weights.tokEmbedding);
    expect(() => resolveTrainConfig({ tables: 'int8' }, { model: 'm', data: 'd', out: 'o' }, 'run.yaml')).toThrow("tables (in run.yaml): expected one of file, fp32, fp16, bf16, q8_0, q4_1, q4_0, got 'int8'");
    expect(resolveTrainConfig({}, { model: 'm', data: 'd', out: 'o', tables: 'q4_1' }).tables).toBe('q4_1');
  });

  it('the GGUF export writes a q8_0 table as the Q8_0 blocks llama.cpp would have written', async () => {
    const m = await LlamaModel.create(weights, { backend: 'cpu', spec: spec('tables q8_0'), seed: 1 });
    const opened = await openModel({ model: fixture(STORIES), tokenizer: fixture(TOK) });
    const gguf = parseGguf(new Uint8Array(Buffer.concat(buildGguf(m.weights, vocabFromTokenizer(opened.tokenizer as SentencePieceBpe)).chunks)));
    const t = gguf.tensors.get('token_embd.weight')!;
    expect(t.type).toBe(GgmlType.Q8_0);
    expect(Buffer.from(t.read()).equals(Buffer.from(llamaCppBlocks('q8_0', denseTable(weights.tokEmbedding))))).toBe(true);
    expect(gguf.tensors.has('output.weight')).toBe(false);
  });
});
