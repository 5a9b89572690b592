// AutoGPTQ / GPTQModel checkpoints → QuantLinear in our blocked32 layout, without re-quantizing.
// Per layer: qweight i32 [in·b/32, out] (each column a little-endian bit stream of b-bit q along `in`, so 3-bit
// values straddle words), qzeros i32 [in/g, out·b/32] (a bit stream along `out`), scales f16 [in/g, out],
// g_idx i32 [in]. W = scale·(q − z): α = scale, β = −scale·z. v1 ("gptq") stores z − 1, v2 ("gptq_v2") z.
// Groups must be contiguous (g_idx[i] = i // g): QA-LoRA pools inputs by the same groups the base is quantized
// by, so an act-order checkpoint (desc_act) cannot be mapped and is refused. Layers stay in the files until the
// model is prepared (FileLinear.quant.read converts one layer at a time); shapes are checked at load.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Bits, QaloraSettings } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { denseWeight } from '../model/dense.ts';
import type { BlockWeights, FileLinear, LlamaWeights, LoadedLinear, ProjectionName, QuantLinear } from '../model/types.ts';
import { packQ, wordsPerRow } from '../reference/numeric.ts';
import { asF32, asI32, readTensor, type SafeDType, type SafeTensor, type StoredTensor } from '../safetensors.ts';
import { HF_PROJECTION, hfToMetaRows, readF32, readHfConfig, readHfTensors, readTable } from './hf.ts';

export interface GptqConfig {
  bits: Bits;
  /** Resolved group size (-1 in the file means one group of `in`; resolved per layer). */
  groupSize: number;
  descAct: boolean;
  sym: boolean;
  /** 'gptq' (v1: stored zero = z − 1) or 'gptq_v2' (stored zero = z). */
  checkpointFormat: 'gptq' | 'gptq_v2';
}

export function readGptqConfig(dir: string): GptqConfig {
  const qc = join(dir, 'quantize_config.json');
  let raw: Record<string, unknown> | undefined;
  let where = qc;
  if (existsSync(qc)) {
    raw = JSON.parse(readFileSync(qc, 'utf8'));
  } else {
    where = join(dir, 'config.json');
    raw = existsSync(where) ? JSON.parse(readFileSync(where, 'utf8')).quantization_config : undefined;
    if (!raw) throw new QaloraError(`${dir}: no quantize_config.json and no quantization_config in config.json`);
  }
  const r = raw!;
  if (r.quant_method !== undefined && r.quant_method !== 'gptq') throw new QaloraError(`${where}: quant_method '${r.quant_method}' is not GPTQ`);
  const bits = Number(r.bits);
  if (![2, 3, 4, 8].includes(bits)) throw new QaloraError(`${where}: bits ${r.bits} is not supported (2, 3, 4, 8)`);
  const groupSize = Number(r.group_size ?? 128);
  if (!(groupSize === -1 || (Number.isInteger(groupSize) && groupSize > 0))) throw new QaloraError(`${where}: group_size ${r.group_size} is invalid`);
  const fmt = String(r.checkpoint_format ?? r.format ?? 'gptq');
  if (fmt !== 'gptq' && fmt !== 'gptq_v2') throw new QaloraError(`${where}: checkpoint_format '${fmt}' is not supported ('gptq' or 'gptq_v2')`);
  const descAct = Boolean(r.desc_act);
  if (descAct) {
    throw new QaloraError(`${where}: desc_act (act-order) is true. QA-LoRA pools each group of g consecutive inputs into one adapter input, so the base must be quantized in the same contiguous groups; an act-order checkpoint permutes the groups (g_idx). Re-quantize with desc_act=false (the paper's setting).`);
  }
  return { bits: bits as Bits, groupSize, descAct, sym: r.sym !== false, checkpointFormat: fmt };
}

/** b bits at bit position `pos` of a little-endian stream of u32 words, word k read by `word(k)`. */
function streamBits(word: (k: number) => number, pos: number, bits: number): number {
  const k = pos >>> 5, s = pos & 31;
  let v = word(k) >>> s;
  if (s + bits > 32) v |= word(k + 1) << (32 - s);
  return v & ((1 << bits) - 1);
}

export interface GptqLayerTensors<T extends { dtype: SafeDType; shape: number[] } = SafeTensor> {
  qweight: T;
  qzeros: T;
  scales: T;
  gIdx?: T;
}

/** Checks a layer's tensor shapes and dtypes (no data read) and returns its group size. */
export function checkGptqLayer(t: GptqLayerTensors<{ dtype: SafeDType; shape: number[] }>, cfg: GptqConfig, out: number, inF: number, where: string): number {
  const b = cfg.bits;
  const group = cfg.groupSize === -1 ? inF : cfg.groupSize;
  if (inF % group !== 0) throw new QaloraError(`${where}: group_size ${group} does not divide in_features ${inF}`);
  const L = inF / group;
  const expect = (name: string, tensor: { dtype: SafeDType; shape: number[] }, shape: number[], dtypes: string[]) => {
    if (tensor.shape.length !== shape.length || tensor.shape.some((s, i) => s !== shape[i])) {
      throw new QaloraError(`${where}.${name} has shape [${tensor.shape}], expected [${shape}] for ${b}-bit, group ${group}, [out ${out}, in ${inF}]`);
    }
    if (!dtypes.includes(tensor.dtype)) throw new QaloraError(`${where}.${name} has dtype ${tensor.dtype}, expected ${dtypes.join(' or ')}`);
  };
  if ((inF * b) % 32 !== 0 || (out * b) % 32 !== 0) throw new QaloraError(`${where}: in ${inF} and out ${out} times ${b} bits must be multiples of 32 for GPTQ packing`);
  expect('qweight', t.qweight, [(inF * b) / 32, out], ['I32', 'U32']);
  expect('qzeros', t.qzeros, [L, (out * b) / 32], ['I32', 'U32']);
  expect('scales', t.scales, [L, out], ['F16', 'F32', 'BF16']);
  if (t.gIdx) expect('g_idx', t.gIdx, [inF], ['I32', 'I64']);
  return group;
}

/**
 * One GPTQ layer → (q blocked32, α, β) for W [out, in]. `rowOrder[r]` is the GPTQ output column that becomes our
 * row r (the HF → Meta q/k permutation); identity when absent.
 */
export function gptqToBlocked32(
  t: GptqLayerTensors, cfg: GptqConfig, out: number, inF: number, where: string, rowOrder?: Int32Array,
): { qweight: Uint32Array; alpha: Float32Array; beta: Float32Array; group: number } {
  const b = cfg.bits;
  const group = checkGptqLayer(t, cfg, out, inF, where);
  const L = inF / group;
  if (t.gIdx) {
    const g = asI32(t.gIdx);
    for (let i = 0; i < inF; i++) {
      if (g[i] !== Math.floor(i / group)) {
        throw new QaloraError(`${where}.g_idx[${i}] = ${g[i]}, expected ${Math.floor(i / group)}: this is an act-order (desc_act) checkpoint. QA-LoRA needs contiguous groups (g_idx[i] = i // ${group}) so pooling and quantization groups agree; re-quantize with desc_act=false.`);
      }
    }
  }
  const qw = asI32(t.qweight), qz = asI32(t.qzeros), sc = asF32(t.scales);
  const zeroOffset = cfg.checkpointFormat === 'gptq' ? 1 : 0;
  const zwords = (out * b) / 32;
  const wpr = wordsPerRow(inF, b);
  const qweight = new Uint32Array(out * wpr);
  const alpha = new Float32Array(out * L);
  const beta = new Float32Array(out * L);
  const qmax = (1 << b) - 1;
  for (let r = 0; r < out; r++) {
    const o = rowOrder ? rowOrder[r] : r;
    for (let k = 0; k < L; k++) {
      const z = streamBits((w) => qz[k * zwords + w], o * b, b) + zeroOffset;
      if (z > qmax + 1) throw new QaloraError(`${where}.qzeros: zero ${z} of column ${o}, group ${k} exceeds ${qmax + 1}`);
      const s = sc[k * out + o];
      alpha[r * L + k] = s;
      beta[r * L + k] = Math.fround(-s * z);
    }
    for (let i = 0; i < inF; i++) packQ(qweight, r * wpr, i, b, streamBits((w) => qw[w * out + o], i * b, b));
  }
  return { qweight, alpha, beta, group };
}

/** The Meta row order of a q/k projection: rowOrder[metaRow] = hfRow. */
function metaRowOrder(rows: number, heads: number): Int32Array {
  return new Int32Array(hfToMetaRows(Float32Array.from({ length: rows }, (_, i) => i), heads, 1));
}

export interface GptqLoadOptions {
  /** Default adapter settings of the bases the layers give (bits and group always come from the checkpoint). */
  settings?: Partial<QaloraSettings>;
}

/** The model in a GPTQ directory: projections are FileLinear whose quant.read converts the layer when asked. */
export function readGptqModel(dir: string, opts: GptqLoadOptions = {}): LlamaWeights<LoadedLinear> {
  const cfg = readGptqConfig(dir);
  const { config } = readHfConfig(dir);
  const tensors = readHfTensors(dir);
  const { dim, hidden, layers, heads, kvHeads, vocab } = config;
  const kvDim = (dim / heads) * kvHeads;
  const stored = (name: string, shape: number[]): StoredTensor => {
    const t = tensors.get(name);
    if (!t) throw new QaloraError(`${dir}: missing tensor '${name}' (expected shape [${shape}])`);
    if (t.shape.join() !== shape.join()) throw new QaloraError(`${t.file}: tensor '${name}' has shape [${t.shape}], expected [${shape}]`);
    return t;
  };
  const float = (name: string, shape: number[]): Float32Array => readF32(stored(name, shape));
  const table = (name: string) => readTable(stored(name, [vocab, dim]), vocab, dim);
  const shapes: Record<ProjectionName, [number, number]> = {
    q: [dim, dim], k: [kvDim, dim], v: [kvDim, dim], o: [dim, dim], gate: [hidden, dim], up: [hidden, dim], down: [dim, hidden],
  };
  const orders = { q: metaRowOrder(dim, heads), k: metaRowOrder(kvDim, kvHeads) } as Partial<Record<ProjectionName, Int32Array>>;
  const blocks: BlockWeights<LoadedLinear>[] = [];
  for (let l = 0; l < layers; l++) {
    const pre = `model.layers.${l}`;
    const proj = {} as Record<ProjectionName, FileLinear>;
    for (const p of Object.keys(shapes) as ProjectionName[]) {
      const [out, inF] = shapes[p];
      const base = `${pre}.${HF_PROJECTION[p]}`;
      const need = (s: string) => {
        const t = tensors.get(`${base}.${s}`);
        if (!t) throw new QaloraError(`${dir}: missing tensor '${base}.${s}' (GPTQ layer [out ${out}, in ${inF}], ${cfg.bits}-bit)`);
        return t;
      };
      const bias = tensors.get(`${base}.bias`);
      if (bias && readF32(bias).some((v) => v !== 0)) throw new QaloraError(`${bias.file}: '${base}.bias' is non-zero; LLaMA projections have no bias`);
      const stored: GptqLayerTensors<StoredTensor> = { qweight: need('qweight'), qzeros: need('qzeros'), scales: need('scales'), gIdx: tensors.get(`${base}.g_idx`) };
      const where = `${dir}: '${base}'`;
      const group = checkGptqLayer(stored, cfg, out, inF, where);
      const read = (settings: Partial<QaloraSettings>): QuantLinear => {
        const m = gptqToBlocked32(
          { qweight: readTensor(stored.qweight), qzeros: readTensor(stored.qzeros), scales: readTensor(stored.scales), gIdx: stored.gIdx && readTensor(stored.gIdx) },
          cfg, out, inF, where, orders[p],
        );
        // β = −s·z needs more than fp16's 11 bits: read as fp32 (prepareWeights narrows only what fits exactly).
        const full: QaloraSettings = { rank: 0, alpha: 0, dropout: 0, pool: 'mean', dtype: 'fp32', ...opts.settings, ...settings, scales: 'fp32', bits: cfg.bits, group };
        return { kind: 'quant', out, in: inF, settings: full, qweight: m.qweight, alpha: m.alpha, beta: m.beta };
      };
      proj[p] = {
        kind: 'file', out, in: inF, fileType: `GPTQ ${cfg.bits}-bit g${group}`, source: `${stored.qweight.file}: layer '${base}'`,
        readFloat: () => denseWeight(read({})),
        quant: { bits: cfg.bits, group, scales: 'fp32', read },
      };
    }
    blocks.push({ attnNorm: float(`${pre}.input_layernorm.weight`, [dim]), ffnNorm: float(`${pre}.post_attention_layernorm.weight`, [dim]), proj });
  }
  const tokEmbedding = table('model.embed_tokens.weight');
  const tied = config.tiedClassifier || !tensors.has('lm_head.weight');
  return {
    config: { ...config, tiedClassifier: tied },
    tokEmbedding,
    blocks,
    finalNorm: float('model.norm.weight', [dim]),
    classifier: tied ? tokEmbedding : table('lm_head.weight'),
  };
}
