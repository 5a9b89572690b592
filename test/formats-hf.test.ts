import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { hfToMetaRows, readHfModel, writeHfModel } from '../runtime/formats/hf.ts';
import { readLlama2c } from '../runtime/formats/llama2c.ts';
import { loadModel } from '../runtime/formats/load.ts';
import { denseTable } from '../runtime/model/dense.ts';
import type { LlamaWeights, LoadedLinear } from '../runtime/model/types.ts';
import { f16BitsToF32, f32To16, f32ToBf16Bits, f32ToF16Bits, readSafetensors, tensorOf, writeSafetensors } from '../runtime/safetensors.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { sentencePieceToHfJson } from '../runtime/tokenizer/hf.ts';
import { fixture } from './fixtures.ts';
import { expectSameWeights, floatOf } from './formats-helpers.ts';

const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';

/** Attention scores q·k after RoPE at positions (pq, pk), for every (q head, its kv head), two RoPE layouts. */
function ropeScores(wq: Float32Array, wk: Float32Array, heads: number, kvHeads: number, dim: number, x: Float32Array, y: Float32Array, layout: 'meta' | 'hf'): number[] {
  const d = dim / heads;
  const matvec = (w: Float32Array, v: Float32Array) => Array.from({ length: w.length / dim }, (_, r) => {
    let s = 0;
    for (let c = 0; c < dim; c++) s += w[r * dim + c] * v[c];
    return s;
  });
  const rope = (v: number[], pos: number) => {
    const out = [...v];
    for (let h = 0; h < v.length / d; h++) {
      for (let i = 0; i < d / 2; i++) {
        const th = pos * 10000 ** (-(2 * i) / d);
        const [a, b] = layout === 'meta' ? [h * d + 2 * i, h * d + 2 * i + 1] : [h * d + i, h * d + i + d / 2];
        out[a] = v[a] * Math.cos(th) - v[b] * Math.sin(th);
        out[b] = v[a] * Math.sin(th) + v[b] * Math.cos(th);
      }
    }
    return out;
  };
  const q = rope(matvec(wq, x), 5), k = rope(matvec(wk, y), 2);
  const scores: number[] = [];
  for (let h = 0; h < heads; h++) {
    const kh = Math.floor(h / (heads / kvHeads));
    let s = 0;
    for (let i = 0; i < d; i++) s += q[h * d + i] * k[kh * d + i];
    scores.push(s);
  }
  return scores;
}

describe('Hugging Face directories', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qalora-hf-'));

  it('un-permutes q/k for GQA: attention scores with HF rotate-half RoPE equal Meta-layout ones', () => {
    const w = readLlama2c(fixture(BIN));
    const { heads, kvHeads, dim } = w.config;
    expect(kvHeads).toBeLessThan(heads); // the case llama2.c's own converter gets wrong
    writeHfModel(join(dir, 'rope'), w);
    const st = readSafetensors(join(dir, 'rope', 'model.safetensors'));
    const hfQ = new Float32Array(st.tensors.get('model.layers.2.self_attn.q_proj.weight')!.data.slice().buffer);
    const hfK = new Float32Array(st.tensors.get('model.layers.2.self_attn.k_proj.weight')!.data.slice().buffer);
    const x = Float32Array.from({ length: dim }, (_, i) => Math.sin(i + 1));
    const y = Float32Array.from({ length: dim }, (_, i) => Math.cos(3 * i));
    const meta = ropeScores(floatOf(w.blocks[2].proj.q), floatOf(w.blocks[2].proj.k), heads, kvHeads, dim, x, y, 'meta');
    const hf = ropeScores(hfQ, hfK, heads, kvHeads, dim, x, y, 'hf');
    hf.forEach((s, i) => expect(s).toBeCloseTo(meta[i], 9));
    // and the HF file really is in another row order (the check above would be vacuous otherwise)
    expect(Buffer.from(hfQ.buffer).equals(Buffer.from(floatOf(w.blocks[2].proj.q).buffer.slice(0)))).toBe(false);
    // permuting k with n_heads instead of n_kv_heads (llama2.c's bug) breaks the scores
    const wrongK = hfToMetaRows(hfK, heads, dim);
    const wrong = ropeScores(floatOf(w.blocks[2].proj.q), wrongK, heads, kvHeads, dim, x, y, 'meta');
    expect(wrong.some((s, i) => Math.abs(s - meta[i]) > 1e-3)).toBe(true);
  });

  it('writes stories260K as an HF directory (single and sharded) and reads it back bit for bit, with tokenizer.json', async () => {
    const w = readLlama2c(fixture(BIN));
    const tok = readLlama2cTokenizer(fixture(TOK));
    for (const shards of [1, 3]) {
      const d = join(dir, `m${shards}`);
      writeHfModel(d, w, { shards });
      const { tokenizer, config } = sentencePieceToHfJson(tok);
      writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tokenizer));
      writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify(config));
      expectSameWeights(w, readHfModel(d));
      const loaded = await loadModel(d);
      expect(loaded.format).toBe('hf');
      expectSameWeights(w, loaded.weights);
      for (const s of ['Once upon a time', 'Hello, world!', 'naïve 😀  two  spaces\n']) {
        expect(loaded.tokenizer.encode(s, { bos: true }), s).toEqual(tok.encode(s, { bos: true }));
        expect(loaded.tokenizer.decode(loaded.tokenizer.encode(s, { bos: true }))).toBe(s);
      }
      const ids = tok.encode('Once upon a time', { bos: true });
      expect(ids.slice(1).map((id, i) => loaded.tokenizer.decodeToken(ids[i], id)).join('')).toBe('Once upon a time');
    }
    // untied: lm_head is read
    const untied: LlamaWeights<LoadedLinear> = { ...w, config: { ...w.config, tiedClassifier: false }, classifier: denseTable(w.tokEmbedding).map((v) => v * 2) };
    writeHfModel(join(dir, 'untied'), untied);
    expectSameWeights(untied, readHfModel(join(dir, 'untied')));
  });

  it('reads F16 and BF16 checkpoints (values are the rounded float32 weights; the token table kept as half bits)', () => {
    const w = readLlama2c(fixture(BIN));
    const d = join(dir, 'half');
    writeHfModel(d, w);
    const st = readSafetensors(join(d, 'model.safetensors'));
    for (const dtype of ['F16', 'BF16'] as const) {
      const half = new Map([...st.tensors].map(([n, t]) => [n, f32To16(dtype, t.shape, new Float32Array(t.data.slice().buffer))]));
      writeSafetensors(join(d, 'model.safetensors'), half);
      const back = readHfModel(d);
      // the token table stays in the checkpoint's half type (bits as stored), the classifier tied to it
      expect(back.tokEmbedding).toMatchObject({ kind: 'half', dtype: dtype === 'F16' ? 'fp16' : 'bf16' });
      expect(back.classifier).toBe(back.tokEmbedding);
      const round = dtype === 'F16' ? (x: number) => f16BitsToF32(f32ToF16Bits(x)) : (x: number) => new Float32Array(new Uint32Array([f32ToBf16Bits(x) << 16]).buffer)[0];
      let bad = 0;
      const we = denseTable(w.tokEmbedding), be = denseTable(back.tokEmbedding);
      for (let i = 0; i < we.length; i += 7) if (be[i] !== round(we[i])) bad++;
      const wd = floatOf(w.blocks[4].proj.down), bd = floatOf(back.blocks[4].proj.down);
      for (let i = 0; i < wd.length; i += 5) if (bd[i] !== round(wd[i])) bad++;
      expect(bad, dtype).toBe(0);
    }
  });

  it('bad directories: missing tensor, wrong shape, unsupported dtype, bad config, missing shard', () => {
    const w = readLlama2c(fixture(BIN));
    const d = join(dir, 'bad');
    writeHfModel(d, w);
    const file = join(d, 'model.safetensors');
    const st = readSafetensors(file);
    const rewrite = (edit: (m: Map<string, ReturnType<typeof tensorOf>>) => void) => {
      const m = new Map([...st.tensors].map(([k, t]) => [k, { ...t, data: t.data.slice() }]));
      edit(m);
      writeSafetensors(file, m);
    };
    const err = () => {
      try { readHfModel(d); } catch (e) { expect(e).toBeInstanceOf(QaloraError); return (e as Error).message; }
      throw new Error('no error');
    };
    rewrite((m) => m.delete('model.layers.1.mlp.up_proj.weight'));
    expect(err()).toMatch(/missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(expected shape \[172,64\]\)/);
    rewrite((m) => m.set('model.norm.weight', tensorOf('F32', [32], new Float32Array(32))));
    expect(err()).toMatch(/model\.safetensors: tensor 'model\.norm\.weight' has shape \[32\], expected \[64\]/);
    rewrite((m) => m.set('model.norm.weight', tensorOf('I32', [64], new Int32Array(64))));
    expect(err()).toMatch(/tensor 'model\.norm\.weight' has dtype I32, expected F32, F16 or BF16/);
    rewrite(() => {});
    const cfg = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
    writeFileSync(join(d, 'config.json'), JSON.stringify({ ...cfg, num_attention_heads: 0 }));
    expect(err()).toMatch(/config\.json: 'num_attention_heads' must be a positive integer/);
    writeFileSync(join(d, 'config.json'), JSON.stringify({ ...cfg, rope_scaling: { type: 'linear', factor: 2 } }));
    expect(err()).toMatch(/rope_scaling .* is not supported/);
    writeFileSync(join(d, 'config.json'), JSON.stringify(cfg));
    writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'model.norm.weight': 'model-2.safetensors' } }));
    expect(err()).toMatch(/model-2\.safetensors: cannot read safetensors file/);
    rmSync(join(d, 'model.safetensors.index.json'));
    rmSync(file);
    expect(err()).toMatch(/no model\.safetensors or model\.safetensors\.index\.json/);
  });
});
