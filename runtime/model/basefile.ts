// Our quantized-base file: a safetensors file holding a model whose projections are QA-LoRA layers (packed q,
// α, β per group) or float, with the model config and every quant layer's settings in the JSON metadata, so a
// quantization (RTN or GPTQ, which takes minutes on big models) is done once and reloaded bit for bit.
import { PROJECTIONS, type Bits, type ActDType, type Pool } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { openSafetensors, readTensor, tensorOf, writeSafetensors, type SafeTensor, type StoredTensor } from '../safetensors.ts';
import type { BlockWeights, Linear, LlamaConfig, LlamaWeights, LoadedLinear, ProjectionName, QuantLinear, TokenTable } from './types.ts';
import { checkScales, scalesOf } from './scales.ts';
import { readTable } from '../formats/hf.ts';
import { tableTensor } from './dense.ts';

export const BASE_FORMAT = 'qalora-base';
const BASE_VERSION = '1';

export function saveQuantizedBase(path: string, w: LlamaWeights, extra: Record<string, string> = {}): void {
  const c = w.config;
  const t = new Map<string, SafeTensor>();
  const settings: Record<string, QuantLinear['settings']> = {};
  // Quantized token tables are stored like quant projections, under their own names (settings included).
  const linear = (name: string, lin: Linear) => {
    if (lin.kind === 'float') {
      t.set(`${name}.weight`, tensorOf('F32', [lin.out, lin.in], lin.w));
      return;
    }
    checkScales(lin, name);
    settings[name] = { ...lin.settings, scales: scalesOf(lin.settings) };
    const groups = lin.in / lin.settings.group;
    // α and β as stored: F32, or F16 for `scales fp16` (the same bits, no conversion either way)
    const st = scalesOf(lin.settings) === 'fp16' ? 'F16' : 'F32';
    t.set(`${name}.qweight`, tensorOf('U32', [lin.out, lin.qweight.length / lin.out], lin.qweight));
    t.set(`${name}.alpha`, tensorOf(st, [lin.out, groups], lin.alpha));
    t.set(`${name}.beta`, tensorOf(st, [lin.out, groups], lin.beta));
  };
  const table = (name: string, tt: TokenTable) => {
    if (tt instanceof Float32Array || tt.kind === 'half') t.set(name, tableTensor(tt, c.vocab, c.dim));
    else linear(name, tt);
  };
  table('tok_embeddings', w.tokEmbedding);
  w.blocks.forEach((b, l) => {
    t.set(`layers.${l}.attention_norm`, tensorOf('F32', [c.dim], b.attnNorm));
    t.set(`layers.${l}.ffn_norm`, tensorOf('F32', [c.dim], b.ffnNorm));
    for (const p of PROJECTIONS) linear(`layers.${l}.${p}`, b.proj[p]);
  });
  t.set('norm', tensorOf('F32', [c.dim], w.finalNorm));
  if (!c.tiedClassifier) table('output', w.classifier);
  writeSafetensors(path, t, { ...extra, format: BASE_FORMAT, version: BASE_VERSION, config: JSON.stringify(c), layers: JSON.stringify(settings) });
}

/** True when the file is a safetensors file written by saveQuantizedBase. */
export function isQuantizedBase(path: string): boolean {
  try {
    const f = openSafetensors(path); // the header alone
    f.close();
    return f.metadata.format === BASE_FORMAT;
  } catch {
    return false;
  }
}

/**
 * Opens a base file one tensor at a time: quant layers are read now, straight into their final arrays (they are
 * used as they are, with the settings the file records); float projections stay in the file (FileLinear).
 */
export function loadQuantizedBase(path: string): { weights: LlamaWeights<LoadedLinear>; metadata: Record<string, string> } {
  const f = openSafetensors(path);
  const md = f.metadata;
  if (md.format !== BASE_FORMAT) throw new QaloraError(`${path}: not a qalora quantized base (metadata format is ${JSON.stringify(md.format)}, expected "${BASE_FORMAT}")`);
  if (md.version !== BASE_VERSION) throw new QaloraError(`${path}: quantized base version ${md.version} is not supported (expected ${BASE_VERSION})`);
  const config = parseJson<LlamaConfig>(md.config, path, 'config');
  const settings = parseJson<Record<string, QuantLinear['settings']>>(md.layers, path, 'layers');
  const c = config;
  const tensor = (name: string, shape: number[]): StoredTensor => {
    const x = f.tensors.get(name);
    if (!x) throw new QaloraError(`${path}: tensor '${name}' is missing`);
    if (x.shape.length !== shape.length || x.shape.some((d, i) => d !== shape[i])) {
      throw new QaloraError(`${path}: tensor '${name}' has shape [${x.shape}], expected [${shape}]`);
    }
    return x;
  };
  const f32Tensor = (name: string, shape: number[]): StoredTensor => {
    const x = tensor(name, shape);
    if (x.dtype !== 'F32') throw new QaloraError(`${path}: tensor '${name}' is ${x.dtype}, expected F32`);
    return x;
  };
  // read() gives each tensor its own aligned array: the typed view is the final array, no second copy.
  const f32 = (name: string, shape: number[]) => new Float32Array(f32Tensor(name, shape).read().buffer);
  // α/β: F32, or F16 bits for layers whose settings say `scales fp16` (files before `scales` are all F32).
  const scaleTensor = (name: string, shape: number[], s: QuantLinear['settings']) => {
    const want = scalesOf(s) === 'fp16' ? 'F16' : 'F32';
    const x = tensor(name, shape);
    if (x.dtype !== want) throw new QaloraError(`${path}: tensor '${name}' is ${x.dtype}, expected ${want} (the layer's scales are ${scalesOf(s)})`);
    const bytes = x.read();
    return want === 'F16' ? new Uint16Array(bytes.buffer) : new Float32Array(bytes.buffer);
  };
  const dims = (p: ProjectionName): [number, number] => {
    const hd = c.dim / c.heads;
    switch (p) {
      case 'q': case 'o': return [c.dim, c.dim];
      case 'k': case 'v': return [c.kvHeads * hd, c.dim];
      case 'gate': case 'up': return [c.hidden, c.dim];
      case 'down': return [c.dim, c.hidden];
    }
  };
  const quant = (name: string, out: number, inF: number, s: QuantLinear['settings']): QuantLinear => {
    checkSettings(s, name, inF, path);
    const qt = tensor(`${name}.qweight`, [out, Math.ceil(inF / 32) * s.bits]);
    if (qt.dtype !== 'U32') throw new QaloraError(`${path}: tensor '${name}.qweight' is ${qt.dtype}, expected U32`);
    const groups = inF / s.group;
    return {
      kind: 'quant', out, in: inF, settings: { ...s, scales: scalesOf(s) },
      qweight: new Uint32Array(qt.read().buffer),
      alpha: scaleTensor(`${name}.alpha`, [out, groups], s), beta: scaleTensor(`${name}.beta`, [out, groups], s),
    };
  };
  const table = (name: string): TokenTable => {
    if (settings[name]) return quant(name, c.vocab, c.dim, settings[name]);
    const x = tensor(name, [c.vocab, c.dim]);
    return x.dtype === 'F16' || x.dtype === 'BF16' ? readTable(x, c.vocab, c.dim) : f32(name, [c.vocab, c.dim]);
  };
  const blocks: BlockWeights<LoadedLinear>[] = [];
  for (let l = 0; l < c.layers; l++) {
    const proj = {} as Record<ProjectionName, LoadedLinear>;
    for (const p of PROJECTIONS) {
      const name = `layers.${l}.${p}`, [out, inF] = dims(p), s = settings[name];
      if (s) {
        proj[p] = quant(name, out, inF, s);
        continue;
      }
      const wt = f32Tensor(`${name}.weight`, [out, inF]);
      proj[p] = { kind: 'file', out, in: inF, fileType: 'F32', source: `${path}: tensor '${wt.name}'`, readFloat: () => new Float32Array(wt.read().buffer) };
    }
    blocks.push({ attnNorm: f32(`layers.${l}.attention_norm`, [c.dim]), ffnNorm: f32(`layers.${l}.ffn_norm`, [c.dim]), proj });
  }
  const tokEmbedding = table('tok_embeddings');
  const weights: LlamaWeights<LoadedLinear> = {
    config, tokEmbedding, blocks, finalNorm: f32('norm', [c.dim]),
    classifier: c.tiedClassifier ? tokEmbedding : table('output'),
  };
  // Everything is read unless a float projection stays in the file: then the file stays open for it.
  if (!blocks.some((b) => PROJECTIONS.some((p) => b.proj[p].kind === 'file'))) f.close();
  return { weights, metadata: md };
}

function parseJson<T>(text: string | undefined, path: string, key: string): T {
  if (text === undefined) throw new QaloraError(`${path}: metadata '${key}' is missing`);
  try {
    return JSON.parse(text) as T;
  } catch (e) {
    throw new QaloraError(`${path}: metadata '${key}' is not valid JSON (${(e as Error).message})`);
  }
}

function checkSettings(s: QuantLinear['settings'], name: string, inF: number, path: string): void {
  const bad = (what: string) => new QaloraError(`${path}: layer ${name}: ${what}`);
  if (![2, 3, 4, 8].includes(s.bits as Bits)) throw bad(`bits ${s.bits} is not 2, 3, 4 or 8`);
  if (!Number.isInteger(s.group) || s.group < 1 || inF % s.group !== 0) throw bad(`group ${s.group} does not divide in_features ${inF}`);
  if (!(['mean', 'sum', 'peft'] as Pool[]).includes(s.pool)) throw bad(`pool ${JSON.stringify(s.pool)} is not mean, sum or peft`);
  if (!(['fp32', 'fp16', 'bf16'] as ActDType[]).includes(s.dtype)) throw bad(`dtype ${JSON.stringify(s.dtype)} is not fp32, fp16 or bf16`);
  if (s.scales !== undefined && s.scales !== 'fp32' && s.scales !== 'fp16') throw bad(`scales ${JSON.stringify(s.scales)} is not fp32 or fp16`);
}
