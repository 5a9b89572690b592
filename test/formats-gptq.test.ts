import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QaloraError } from '../runtime/errors.ts';
import { gptqToBlocked32, readGptqModel, type GptqConfig } from '../runtime/formats/gptq.ts';
import { hfConfigJson, hfToMetaRows } from '../runtime/formats/hf.ts';
import { quantOf } from './formats-helpers.ts';
import { unpackQ, wordsPerRow } from '../runtime/reference/numeric.ts';
import { f16BitsToF32, f32ToF16Bits, type SafeTensor, tensorOf, writeSafetensors } from '../runtime/safetensors.ts';

/** AutoGPTQ's pack loop, transcribed: 32/b values per word for 2/4/8 bits; 3-bit groups of 32 over 3 words. */
function autogptqPack(values: number[], bits: number): number[] {
  const words: number[] = [];
  let i = 0;
  while (i < values.length) {
    if (bits !== 3) {
      let w = 0;
      for (let j = i; j < i + 32 / bits; j++) w |= values[j] << (bits * (j - i));
      words.push(w >>> 0);
      i += 32 / bits;
      continue;
    }
    let w = 0;
    for (let j = i; j < i + 10; j++) w |= values[j] << (3 * (j - i));
    i += 10;
    w |= values[i] << 30;
    words.push(w >>> 0);
    w = (values[i] >> 2) & 1;
    i += 1;
    for (let j = i; j < i + 10; j++) w |= values[j] << (3 * (j - i) + 1);
    i += 10;
    w |= values[i] << 31;
    words.push(w >>> 0);
    w = (values[i] >> 1) & 3;
    i += 1;
    for (let j = i; j < i + 10; j++) w |= values[j] << (3 * (j - i) + 2);
    i += 10;
    words.push(w >>> 0);
  }
  return words;
}

/** A deterministic generator so failures reproduce. */
function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 32;
  };
}

interface Layer { q: number[][]; z: number[][]; scales: number[][]; tensors: Record<string, SafeTensor> }

/** A GPTQ layer W [out, in] from known q [out][in], z [out][L] and f16 scales [out][L]. */
function makeLayer(out: number, inF: number, bits: number, group: number, format: 'gptq' | 'gptq_v2', seed: number): Layer {
  const r = rng(seed);
  const qmax = 2 ** bits - 1, L = inF / group;
  const q = Array.from({ length: out }, () => Array.from({ length: inF }, () => Math.floor(r() * (qmax + 1))));
  // v1 stores z − 1, so z = 0 cannot be stored there (AutoGPTQ's known quirk): use 1..qmax for v1
  const z = Array.from({ length: out }, () => Array.from({ length: L }, () => (format === 'gptq' ? 1 : 0) + Math.floor(r() * qmax)));
  const scales = Array.from({ length: out }, () => Array.from({ length: L }, () => f16BitsToF32(f32ToF16Bits(0.001 + r() * 0.05))));
  const qweight = new Int32Array((inF * bits) / 32 * out);
  for (let o = 0; o < out; o++) {
    autogptqPack(q[o], bits).forEach((w, row) => { qweight[row * out + o] = w | 0; });
  }
  const zw = (out * bits) / 32;
  const qzeros = new Int32Array(L * zw);
  for (let k = 0; k < L; k++) {
    const stored = Array.from({ length: out }, (_, o) => z[o][k] - (format === 'gptq' ? 1 : 0));
    autogptqPack(stored, bits).forEach((w, c) => { qzeros[k * zw + c] = w | 0; });
  }
  const sc = new Uint16Array(L * out);
  for (let k = 0; k < L; k++) for (let o = 0; o < out; o++) sc[k * out + o] = f32ToF16Bits(scales[o][k]);
  const gIdx = Int32Array.from({ length: inF }, (_, i) => Math.floor(i / group));
  return {
    q, z, scales,
    tensors: {
      qweight: tensorOf('I32', [(inF * bits) / 32, out], qweight),
      qzeros: tensorOf('I32', [L, zw], qzeros),
      scales: tensorOf('F16', [L, out], sc),
      g_idx: tensorOf('I32', [inF], gIdx),
    },
  };
}

const cfgOf = (bits: number, group: number, checkpointFormat: 'gptq' | 'gptq_v2'): GptqConfig =>
  ({ bits: bits as GptqConfig['bits'], groupSize: group, descAct: false, sym: false, checkpointFormat });

describe('GPTQ checkpoints', () => {
  it('maps q, zeros and scales exactly onto (q blocked32, α = scale, β = −scale·z) for 2/3/4/8 bits, v1 and v2', () => {
    for (const bits of [2, 3, 4, 8]) {
      for (const format of ['gptq', 'gptq_v2'] as const) {
        const out = 64, inF = 128, group = 32, L = inF / group;
        const layer = makeLayer(out, inF, bits, group, format, bits * 7 + (format === 'gptq' ? 1 : 2));
        const t = layer.tensors;
        const m = gptqToBlocked32({ qweight: t.qweight, qzeros: t.qzeros, scales: t.scales, gIdx: t.g_idx }, cfgOf(bits, group, format), out, inF, 'layer');
        const wpr = wordsPerRow(inF, bits);
        let qBad = 0;
        for (let o = 0; o < out; o++) {
          for (let i = 0; i < inF; i++) if (unpackQ(m.qweight, o * wpr, i, bits) !== layer.q[o][i]) qBad++;
          for (let k = 0; k < L; k++) {
            expect(m.alpha[o * L + k]).toBe(layer.scales[o][k]);
            expect(m.beta[o * L + k]).toBe(Math.fround(-layer.scales[o][k] * layer.z[o][k]));
          }
        }
        expect(qBad, `${bits}-bit ${format}`).toBe(0);
        // and the dequantized weight is scale·(q − z), GPTQ's own formula
        const o = 5, i = 77, k = Math.floor(i / group);
        const w = m.alpha[o * L + k] * unpackQ(m.qweight, o * wpr, i, bits) + m.beta[o * L + k];
        expect(w).toBeCloseTo(layer.scales[o][k] * (layer.q[o][i] - layer.z[o][k]), 6);
      }
    }
  });

  it('refuses act-order: desc_act true, or a g_idx that is not i // g', () => {
    const layer = makeLayer(32, 64, 4, 32, 'gptq', 3);
    const perm = tensorOf('I32', [64], Int32Array.from({ length: 64 }, (_, i) => i % 2));
    const t = layer.tensors;
    expect(() => gptqToBlocked32({ qweight: t.qweight, qzeros: t.qzeros, scales: t.scales, gIdx: perm }, cfgOf(4, 32, 'gptq'), 32, 64, 'L'))
      .toThrow(/L\.g_idx\[1\] = 1, expected 0: this is an act-order \(desc_act\) checkpoint/);
    expect(() => gptqToBlocked32({ qweight: t.qweight, qzeros: t.qzeros, scales: t.scales }, cfgOf(4, 16, 'gptq'), 32, 64, 'L'))
      .toThrow(/L\.qzeros has shape \[2,4\], expected \[4,4\]/);
    const dir = mkdtempSync(join(tmpdir(), 'qalora-gptq-act-'));
    writeFileSync(join(dir, 'quantize_config.json'), JSON.stringify({ bits: 4, group_size: 32, desc_act: true }));
    expect(() => readGptqModel(dir)).toThrow(QaloraError);
    expect(() => readGptqModel(dir)).toThrow(/desc_act \(act-order\) is true.*contiguous groups/);
    writeFileSync(join(dir, 'quantize_config.json'), JSON.stringify({ bits: 5, group_size: 32 }));
    expect(() => readGptqModel(dir)).toThrow(/bits 5 is not supported/);
  });

  it('loads a whole GPTQ LLaMA directory: projections quantized, q/k rows in Meta order (GQA), the rest float', () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-gptq-'));
    const c = { dim: 64, hidden: 96, layers: 2, heads: 4, kvHeads: 2, vocab: 40, context: 32, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true };
    const kvDim = 32, bits = 3, group = 32;
    const shapes: Record<string, [number, number]> = {
      'self_attn.q_proj': [64, 64], 'self_attn.k_proj': [kvDim, 64], 'self_attn.v_proj': [kvDim, 64], 'self_attn.o_proj': [64, 64],
      'mlp.gate_proj': [96, 64], 'mlp.up_proj': [96, 64], 'mlp.down_proj': [64, 96],
    };
    const tensors = new Map<string, SafeTensor>();
    const layers: Record<string, Layer> = {};
    const norm = tensorOf('F32', [64], Float32Array.from({ length: 64 }, (_, i) => 1 + i / 64));
    for (let l = 0; l < c.layers; l++) {
      tensors.set(`model.layers.${l}.input_layernorm.weight`, norm);
      tensors.set(`model.layers.${l}.post_attention_layernorm.weight`, norm);
      Object.entries(shapes).forEach(([name, [out, inF]], n) => {
        const layer = makeLayer(out, inF, bits, group, 'gptq_v2', 100 * l + n);
        layers[`${l}.${name}`] = layer;
        for (const [k, t] of Object.entries(layer.tensors)) tensors.set(`model.layers.${l}.${name}.${k}`, t);
      });
    }
    tensors.set('model.embed_tokens.weight', tensorOf('F32', [40, 64], Float32Array.from({ length: 40 * 64 }, (_, i) => i / 100)));
    tensors.set('model.norm.weight', norm);
    mkdirSync(dir, { recursive: true });
    writeSafetensors(join(dir, 'model.safetensors'), tensors);
    writeFileSync(join(dir, 'config.json'), JSON.stringify(hfConfigJson(c)));
    writeFileSync(join(dir, 'quantize_config.json'), JSON.stringify({ bits, group_size: group, desc_act: false, sym: false, checkpoint_format: 'gptq_v2' }));
    const w = readGptqModel(dir, { settings: { rank: 8, alpha: 16 } });
    expect(w.config).toEqual(c);
    const L = 64 / group, wpr = wordsPerRow(64, bits);
    for (const [p, name, heads] of [['q', 'self_attn.q_proj', 4], ['k', 'self_attn.k_proj', 2], ['v', 'self_attn.v_proj', 0]] as const) {
      const lin = quantOf(w.blocks[1].proj[p]);
      expect(lin.kind).toBe('quant');
      expect(lin.settings).toMatchObject({ bits, group, rank: 8, alpha: 16 });
      const src = layers[`1.${name}`];
      // dequantize both sides and compare after moving HF rows to Meta rows with the (separately tested) permutation
      const hfW = new Float32Array(lin.out * 64);
      for (let o = 0; o < lin.out; o++) for (let i = 0; i < 64; i++) hfW[o * 64 + i] = src.scales[o][Math.floor(i / group)] * (src.q[o][i] - src.z[o][Math.floor(i / group)]);
      const expected = heads ? hfToMetaRows(hfW, heads, 64) : hfW;
      let worst = 0;
      for (let o = 0; o < lin.out; o++) {
        for (let i = 0; i < 64; i++) {
          const k = Math.floor(i / group);
          const got = lin.alpha[o * L + k] * unpackQ(lin.qweight, o * wpr, i, bits) + lin.beta[o * L + k];
          worst = Math.max(worst, Math.abs(got - expected[o * 64 + i]));
        }
      }
      expect(worst, p).toBeLessThan(1e-6);
    }
    expect(w.classifier).toBe(w.tokEmbedding);
    expect(w.blocks[0].attnNorm[63]).toBe(Math.fround(1 + 63 / 64));
  });
});
