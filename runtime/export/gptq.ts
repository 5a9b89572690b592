// GPTQ-layout export (HF names, qweight i32 [in·b/32, out] as a little-endian bit stream along `in`, g_idx, HF q/k
// row order). A merged QA-LoRA layer has W = α·q + β with a float β per (row, group): in GPTQ's W = s·(q − z) its
// zero z = −β/α is fractional, so **integer-zero GPTQ cannot hold a merged model**. The default here therefore
// stores float zeros (`qzeros` F32 [in/g, out], `scales` F32 [in/g, out], quantize_config zero_dtype "float32").
// With intZeros the standard packed integer zeros (v1, stored z − 1) and F16 scales are written — exact only
// when every z is an integer and every α is an fp16 value (a GPTQ-quantized base); otherwise it is refused,
// unless lossy, which rounds and reports the error. Layers GPTQ cannot pack (in·b or out·b not a multiple of 32)
// are written as exact float weights and listed in modules_not_quantized.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { QaloraError } from '../errors.ts';
import { HF_PROJECTION, hfConfigJson, metaToHfRows } from '../formats/hf.ts';
import type { Linear, LlamaWeights, ProjectionName, QuantLinear } from '../model/types.ts';
import { unpackQ, wordsPerRow } from '../reference/numeric.ts';
import { f16BitsToF32, f32ToF16Bits, f32To16, tensorOf, writeFileAtomic, writeSafetensors, type SafeTensor } from '../safetensors.ts';
import { PROJECTIONS } from '../../dsl/resolved.ts';
import { denseWeight } from './gguf.ts';
import { tableTensor } from '../model/dense.ts';
import { scaleValues } from '../model/scales.ts';

export interface GptqExportOptions {
  intZeros?: boolean;
  lossy?: boolean;
}

export interface GptqExportResult {
  maxAbsError: number;
  quantized: number;
  dense: string[];
}

/** Sets b bits at bit position `pos` of a little-endian u32 stream (word k at words[k·stride + col]). */
function putBits(words: Int32Array, k0: number, stride: number, col: number, pos: number, bits: number, v: number): void {
  const k = pos >>> 5, s = pos & 31;
  words[(k0 + k) * stride + col] |= v << s;
  if (s + bits > 32) words[(k0 + k + 1) * stride + col] |= v >>> (32 - s);
}

/** Row permutation Meta → HF for q/k: hfRow → metaRow. */
function hfOrder(rows: number, heads: number): Int32Array {
  return Int32Array.from(metaToHfRows(Float32Array.from({ length: rows }, (_, i) => i), heads, 1));
}

function gptqLayer(lin: QuantLinear, order: Int32Array | null, o: GptqExportOptions, where: string): { tensors: [string, SafeTensor][]; maxErr: number } {
  const { out, in: inF } = lin;
  const { bits: b, group } = lin.settings;
  const L = inF / group, wpr = wordsPerRow(inF, b);
  const alphas = scaleValues(lin.alpha), betas = scaleValues(lin.beta);
  const qweight = new Int32Array(((inF * b) / 32) * out);
  const scales = new Float32Array(L * out), zeros = new Float32Array(L * out);
  let maxErr = 0;
  for (let c = 0; c < out; c++) {
    const r = order ? order[c] : c; // our (Meta) row that becomes GPTQ column c
    for (let i = 0; i < inF; i++) putBits(qweight, 0, out, c, i * b, b, unpackQ(lin.qweight, r * wpr, i, b));
    for (let k = 0; k < L; k++) {
      const alpha = alphas[r * L + k], beta = betas[r * L + k];
      scales[k * out + c] = alpha;
      zeros[k * out + c] = -beta / alpha;
    }
  }
  const tensors: [string, SafeTensor][] = [['qweight', tensorOf('I32', [(inF * b) / 32, out], qweight)]];
  tensors.push(['g_idx', tensorOf('I32', [inF], Int32Array.from({ length: inF }, (_, i) => Math.floor(i / group)))]);
  if (!o.intZeros) {
    tensors.push(['scales', tensorOf('F32', [L, out], scales)], ['qzeros', tensorOf('F32', [L, out], zeros)]);
    // W = s·(q − z) in fp32 against α·q + β: only rounding of the division.
    for (let k = 0; k < L * out; k++) {
      for (const q of [0, (1 << b) - 1]) {
        const c = k % out, kk = Math.floor(k / out), r = order ? order[c] : c;
        const ours = Math.fround(alphas[r * L + kk] * q) + betas[r * L + kk];
        maxErr = Math.max(maxErr, Math.abs(Math.fround(scales[k] * Math.fround(q - zeros[k])) - ours));
      }
    }
    return { tensors, maxErr };
  }
  const qmax = (1 << b) - 1;
  const qzeros = new Int32Array(L * ((out * b) / 32));
  let worstZ = 0, worstS = 0;
  for (let k = 0; k < L; k++) {
    for (let c = 0; c < out; c++) {
      const z = zeros[k * out + c], zi = Math.min(qmax + 1, Math.max(1, Math.round(z)));
      worstZ = Math.max(worstZ, Math.abs(z - zi));
      const s16 = f16BitsToF32(f32ToF16Bits(scales[k * out + c]));
      worstS = Math.max(worstS, Math.abs(s16 - scales[k * out + c]));
      putBits(qzeros, (k * out * b) / 32, 1, 0, c * b, b, zi - 1); // row k of [L, out·b/32]; v1 stores z − 1
      for (const q of [0, qmax]) {
        const r = order ? order[c] : c;
        const ours = Math.fround(alphas[r * L + k] * q) + betas[r * L + k];
        maxErr = Math.max(maxErr, Math.abs(s16 * (q - zi) - ours));
      }
    }
  }
  if ((worstZ > 1e-4 || worstS > 0) && !o.lossy) {
    throw new QaloraError(
      `${where}: integer-zero GPTQ cannot hold this layer exactly — ${worstZ > 1e-4 ? `its zeros −β/α are fractional (up to ${worstZ.toFixed(3)} from an integer), as every merged QA-LoRA model's are` : `its scales are not fp16 values`}. ` +
        'Export with float zeros (the default), as GGUF, or pass --lossy to round them (the report gives the error).',
    );
  }
  tensors.push(['scales', f32To16('F16', [L, out], scales)], ['qzeros', tensorOf('I32', [L, (out * b) / 32], qzeros)]);
  return { tensors, maxErr };
}

export function writeGptqModel(dir: string, w: LlamaWeights, o: GptqExportOptions = {}): GptqExportResult {
  const c = w.config;
  const quant = w.blocks.flatMap((b) => PROJECTIONS.map((p) => b.proj[p])).filter((l): l is QuantLinear => l.kind === 'quant');
  if (quant.length === 0) throw new QaloraError('GPTQ export needs a quantized model (give --spec to quantize a float one)');
  const { bits, group } = quant[0].settings;
  if (quant.some((l) => l.settings.bits !== bits)) throw new QaloraError('GPTQ export: quantize_config holds one bit width, the model mixes several; export GGUF or safetensors');
  const tensors: [string, SafeTensor][] = [['model.embed_tokens.weight', tableTensor(w.tokEmbedding, c.vocab, c.dim)]];
  const dense: string[] = [];
  const groupPattern: Record<string, number> = {};
  let maxErr = 0, quantized = 0;
  w.blocks.forEach((b, l) => {
    const pre = `model.layers.${l}`;
    tensors.push([`${pre}.input_layernorm.weight`, tensorOf('F32', [c.dim], b.attnNorm)]);
    tensors.push([`${pre}.post_attention_layernorm.weight`, tensorOf('F32', [c.dim], b.ffnNorm)]);
    for (const p of PROJECTIONS as readonly ProjectionName[]) {
      const lin: Linear = b.proj[p];
      const name = `${pre}.${HF_PROJECTION[p]}`;
      const heads = p === 'q' ? c.heads : p === 'k' ? c.kvHeads : 0;
      const packable = lin.kind === 'quant' && (lin.in * bits) % 32 === 0 && (!o.intZeros || (lin.out * bits) % 32 === 0);
      if (!packable) {
        let wd = denseWeight(lin);
        if (heads) wd = metaToHfRows(wd, heads, lin.in);
        tensors.push([`${name}.weight`, tensorOf('F32', [lin.out, lin.in], wd)]);
        if (lin.kind === 'quant') dense.push(`${l}.${HF_PROJECTION[p]}`);
        continue;
      }
      const ql = lin as QuantLinear;
      if (ql.settings.group !== group) groupPattern[`${pre}.${HF_PROJECTION[p]}`] = ql.settings.group;
      const r = gptqLayer(ql, heads ? hfOrder(ql.out, heads) : null, o, name);
      maxErr = Math.max(maxErr, r.maxErr);
      for (const [suffix, t] of r.tensors) tensors.push([`${name}.${suffix}`, t]);
      quantized++;
    }
  });
  tensors.push(['model.norm.weight', tensorOf('F32', [c.dim], w.finalNorm)]);
  if (!c.tiedClassifier) tensors.push(['lm_head.weight', tableTensor(w.classifier, c.vocab, c.dim)]);
  mkdirSync(dir, { recursive: true });
  const qc: Record<string, unknown> = {
    quant_method: 'gptq', bits, group_size: group, desc_act: false, sym: false, true_sequential: true,
    checkpoint_format: 'gptq', zero_dtype: o.intZeros ? 'int32' : 'float32',
  };
  if (Object.keys(groupPattern).length) qc.qalora_group_size_pattern = groupPattern;
  if (dense.length) qc.modules_not_quantized = dense;
  if (!o.intZeros) qc.note = 'float zero points (qzeros F32, W = scales·(q − qzeros)): a merged QA-LoRA model has fractional zeros, which packed integer qzeros cannot hold';
  const enc = new TextEncoder();
  writeFileAtomic(join(dir, 'config.json'), [enc.encode(JSON.stringify(hfConfigJson(c), null, 2) + '\n')]);
  writeFileAtomic(join(dir, 'quantize_config.json'), [enc.encode(JSON.stringify(qc, null, 2) + '\n')]);
  writeSafetensors(join(dir, 'model.safetensors'), new Map(tensors), { format: 'pt' });
  return { maxAbsError: maxErr, quantized, dense };
}
