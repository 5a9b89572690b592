// GPTQ export: float zeros hold a merged QA-LoRA model exactly (decoded here independently of the writer);
// integer zeros are refused for it (fractional zeros), written with --lossy within the reported error, and
// written exactly for a base whose zeros are integers — read back by the GPTQ loader bit for bit.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { mergeModel } from '../runtime/cli/merge.ts';
import { denseWeight } from '../runtime/export/gguf.ts';
import { writeGptqModel } from '../runtime/export/gptq.ts';
import { readGptqModel } from '../runtime/formats/gptq.ts';
import { hfToMetaRows } from '../runtime/formats/hf.ts';
import { quantize as refQuantize } from '../runtime/reference/qalora.ts';
import type { LlamaWeights, QuantLinear } from '../runtime/model/types.ts';
import { floatOf, quantOf } from './formats-helpers.ts';
import { f16BitsToF32, f32ToF16Bits, asF32, asI32, readSafetensors } from '../runtime/safetensors.ts';
import { STORIES, TOK, trainStories, type TrainedStories } from './train-fixture.ts';

const PROJ = { q: 'self_attn.q_proj', k: 'self_attn.k_proj', v: 'self_attn.v_proj', o: 'self_attn.o_proj', gate: 'mlp.gate_proj', up: 'mlp.up_proj', down: 'mlp.down_proj' } as const;

function maxDiff(a: Float32Array, b: Float32Array): number {
  let e = 0;
  for (let i = 0; i < a.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e;
}

describe('GPTQ export', () => {
  let t: TrainedStories;
  let merged: LlamaWeights;
  beforeAll(async () => {
    t = await trainStories(4);
    merged = (await mergeModel(t.model)).weights;
  });

  it('float zeros hold the merged model: W = scales·(q − qzeros) decodes to α·q + β', () => {
    const dir = join(t.dir, 'gptq-float');
    const r = writeGptqModel(dir, merged);
    expect(r.dense.length).toBe(5); // down: in = 172, 172·4 bits is not a multiple of 32
    const qc = JSON.parse(readFileSync(join(dir, 'quantize_config.json'), 'utf8'));
    expect(qc).toMatchObject({ bits: 4, group_size: 32, desc_act: false, zero_dtype: 'float32' });
    const st = readSafetensors(join(dir, 'model.safetensors'));
    const c = merged.config;
    for (let l = 0; l < c.layers; l++) {
      for (const p of ['q', 'k', 'gate'] as const) {
        const lin = merged.blocks[l].proj[p] as QuantLinear;
        const pre = `model.layers.${l}.${PROJ[p]}`;
        const qw = asI32(st.tensors.get(`${pre}.qweight`)!), sc = asF32(st.tensors.get(`${pre}.scales`)!), z = asF32(st.tensors.get(`${pre}.qzeros`)!);
        const { out, in: inF } = lin;
        // Independent decode: 8 nibbles per i32 along `in`, column = output.
        let w: Float32Array = new Float32Array(out * inF);
        for (let o = 0; o < out; o++) {
          for (let i = 0; i < inF; i++) {
            const q = (qw[(i >> 3) * out + o] >>> ((i & 7) * 4)) & 15;
            const k = Math.floor(i / 32);
            w[o * inF + i] = sc[k * out + o] * (q - z[k * out + o]);
          }
        }
        if (p === 'q') w = hfToMetaRows(w, c.heads, inF);
        if (p === 'k') w = hfToMetaRows(w, c.kvHeads, inF);
        expect(maxDiff(w, denseWeight(lin))).toBeLessThan(1e-5);
      }
      expect(st.tensors.get(`model.layers.${l}.mlp.down_proj.weight`)!.shape).toEqual([64, 172]);
    }
    // Readers of integer zeros refuse it loudly instead of misreading it.
    expect(() => readGptqModel(dir)).toThrow(/qzeros has (shape|dtype)/);
  });

  it('integer zeros: refused for a merged model (fractional zeros)', () => {
    expect(() => writeGptqModel(join(t.dir, 'gptq-int'), merged, { intZeros: true })).toThrow(/integer-zero GPTQ cannot hold this layer exactly — its zeros −β\/α are fractional/);
  });

  it('integer zeros: lossy within the reported error, exact for integer zeros (read back by the GPTQ loader)', () => {
    // A small model every GPTQ packing fits (dims multiples of 8), quantized by the reference RTN.
    const cfg = { dim: 64, hidden: 128, layers: 2, heads: 4, kvHeads: 2, vocab: 32, context: 64, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true };
    let seed = 99;
    const rnd = (n: number) => Float32Array.from({ length: n }, () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5) * 0.2);
    const settings = { bits: 4 as const, group: 32, rank: 4, alpha: 8, dropout: 0, pool: 'mean' as const, dtype: 'fp32' as const, scales: 'fp32' as const };
    const quant = (out: number, inF: number): QuantLinear => ({ kind: 'quant', out, in: inF, settings, ...refQuantize(rnd(out * inF), out, inF, 4, 32) });
    const emb = rnd(cfg.vocab * cfg.dim);
    const w: LlamaWeights = {
      config: cfg, tokEmbedding: emb, finalNorm: new Float32Array(cfg.dim).fill(1), classifier: emb,
      blocks: Array.from({ length: cfg.layers }, () => ({
        attnNorm: new Float32Array(cfg.dim).fill(1), ffnNorm: new Float32Array(cfg.dim).fill(1),
        proj: { q: quant(64, 64), k: quant(32, 64), v: quant(32, 64), o: quant(64, 64), gate: quant(128, 64), up: quant(128, 64), down: quant(64, 128) },
      })),
    };
    expect(() => writeGptqModel(join(t.dir, 'small-int'), w, { intZeros: true })).toThrow(/zeros −β\/α are fractional/);
    const lossyDir = join(t.dir, 'gptq-lossy');
    const r = writeGptqModel(lossyDir, w, { intZeros: true, lossy: true });
    expect(r.maxAbsError).toBeGreaterThan(0);
    expect(r.dense).toEqual([]);
    const back = readGptqModel(lossyDir);
    // fp16 scales and integer zeros (what a GPTQ checkpoint holds) round-trip bit for bit.
    const snapped: LlamaWeights = {
      ...w,
      blocks: w.blocks.map((b) => ({
        ...b,
        proj: Object.fromEntries(Object.entries(b.proj).map(([p, lin]) => {
          const l = lin as QuantLinear;
          const alpha = Float32Array.from(l.alpha, (a) => f16BitsToF32(f32ToF16Bits(a)));
          const beta = Float32Array.from(l.beta, (bb, i) => Math.fround(-alpha[i] * Math.min(16, Math.max(1, Math.round(-bb / l.alpha[i])))));
          return [p, { ...l, alpha, beta }];
        })) as never,
      })),
    };
    const exactDir = join(t.dir, 'gptq-exact');
    expect(writeGptqModel(exactDir, snapped, { intZeros: true }).maxAbsError).toBeLessThan(1e-6);
    const exact = readGptqModel(exactDir);
    for (let l = 0; l < cfg.layers; l++) {
      for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
        expect(maxDiff(floatOf(back.blocks[l].proj[p]), denseWeight(w.blocks[l].proj[p]))).toBeLessThanOrEqual(r.maxAbsError * (1 + 1e-6) + 1e-7);
        const s = snapped.blocks[l].proj[p] as QuantLinear, e = quantOf(exact.blocks[l].proj[p]);
        expect(Array.from(e.qweight)).toEqual(Array.from(s.qweight));
        expect(Array.from(e.alpha)).toEqual(Array.from(s.alpha));
        expect(Array.from(e.beta)).toEqual(Array.from(s.beta));
      }
    }
  });
});
