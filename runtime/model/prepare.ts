// Turning loaded weights into what a LlamaModel runs: the native ops loaded, float projections quantized into
// the spec's layout (round-to-nearest here, or GPTQ on calibration activations), adapters initialised or checked.
import { PROJECTIONS, type ResolvedLayer, type ResolvedSpec } from '../../dsl/resolved.ts';
import type { CreateOptions } from './llama.ts';
import type { AdapterSet, BackendName, BlockWeights, Linear, LlamaWeights, ProjectionName, QuantLinear } from './types.ts';
import { DEFAULT_CUDA_ARCHS } from '../../dsl/defaults.ts';
import { createHash } from 'node:crypto';
import { loadNativeOps, specializationId, type NativeOps } from './native-ops.ts';
import { checkAdapters, initAdapters } from './adapters.ts';
import { QaloraError } from '../errors.ts';

/** Token sequences to run the float model on for GPTQ calibration (each at most config.context long). */
export interface CalibrationSource {
  sequences: Int32Array[];
}

export interface Prepared {
  spec?: ResolvedSpec;
  weights: LlamaWeights;
  adapters: AdapterSet;
  native: NativeOps;
}

export async function prepareWeights(weights: LlamaWeights, opts: CreateOptions): Promise<Prepared> {
  checkConfig(weights);
  // A quantized model (our base file, a GPTQ checkpoint) without a spec runs with the settings it carries.
  const spec = opts.spec ?? specOfQuantized(weights, opts.backend);
  if (spec) checkShape(weights, spec);
  const native = await loadNativeOps(spec, opts.backend);
  let out = weights;
  if (spec) {
    const layers = layerSettings(spec);
    const method = opts.quantize ?? 'rtn';
    if (method === 'gptq') {
      const { quantizeGptq } = await import('./gptq-calib.ts');
      out = await quantizeGptq(weights, layers, native, opts);
    } else {
      out = quantizeRtn(weights, layers, native, opts.onProgress);
    }
  }
  const adapters = opts.adapters ?? initAdapters(out, opts.seed ?? 0);
  checkAdapters(out, adapters);
  return { spec, weights: out, adapters, native };
}

/**
 * The spec a quantized model implies: each projection's settings as stored (the same in every block), no
 * adapter unless the layers carry a rank. Undefined for a float model.
 */
export function specOfQuantized(w: LlamaWeights, backend: BackendName): ResolvedSpec | undefined {
  const layers: ResolvedLayer[] = [];
  for (const p of PROJECTIONS) {
    const first = w.blocks[0]?.proj[p];
    if (!first || first.kind !== 'quant') {
      if (w.blocks.some((b) => b.proj[p].kind === 'quant')) throw new QaloraError(`projection ${p} is quantized in some blocks only; give a spec (--spec)`);
      continue;
    }
    w.blocks.forEach((b, l) => {
      const lin = b.proj[p];
      const same = lin.kind === 'quant' && (Object.keys(first.settings) as Array<keyof QuantLinear['settings']>).every((k) => lin.settings[k] === first.settings[k]);
      if (!same) throw new QaloraError(`layers.${l}.${p} is quantized differently from layers.0.${p}; give a spec (--spec)`);
    });
    layers.push({ ...first.settings, name: p, projection: p, inFeatures: first.in, outFeatures: first.out, count: w.blocks.length });
  }
  if (layers.length === 0) return undefined;
  const c = w.config;
  return {
    name: `quantized_${createHash('sha256').update(JSON.stringify(layers)).digest('hex').slice(0, 12)}`,
    file: '<settings stored in the model>',
    model: { dim: c.dim, hidden: c.hidden, layers: c.layers, heads: c.heads, kvHeads: c.kvHeads, vocab: c.vocab, context: c.context, ropeTheta: c.ropeTheta, normEps: c.normEps },
    layers,
    targets: { cpu: true, cuda: backend === 'cpu' ? null : { archs: [...DEFAULT_CUDA_ARCHS] } },
  };
}

function checkConfig(w: LlamaWeights): void {
  const c = w.config;
  if (c.dim % c.heads !== 0) throw new QaloraError(`dim ${c.dim} is not a multiple of heads ${c.heads}`);
  if (c.heads % c.kvHeads !== 0) throw new QaloraError(`heads ${c.heads} is not a multiple of kvHeads ${c.kvHeads}`);
  if ((c.dim / c.heads) % 2 !== 0) throw new QaloraError(`head size ${c.dim / c.heads} must be even for RoPE`);
  if (w.blocks.length !== c.layers) throw new QaloraError(`config says ${c.layers} layers, weights have ${w.blocks.length} blocks`);
  // Sizes are checked here, by tensor name, rather than by the native wrappers at the first call.
  const expect = (name: string, got: number, want: number) => {
    if (got !== want) throw new QaloraError(`weights: ${name} has ${got} values, expected ${want}`);
  };
  expect('tok_embeddings', w.tokEmbedding.length, c.vocab * c.dim);
  expect('classifier', w.classifier.length, c.vocab * c.dim);
  expect('final norm', w.finalNorm.length, c.dim);
  const kv = (c.dim / c.heads) * c.kvHeads;
  const shape: Record<ProjectionName, [number, number]> = { q: [c.dim, c.dim], k: [kv, c.dim], v: [kv, c.dim], o: [c.dim, c.dim], gate: [c.hidden, c.dim], up: [c.hidden, c.dim], down: [c.dim, c.hidden] };
  w.blocks.forEach((b, l) => {
    expect(`layers.${l}.attention_norm`, b.attnNorm.length, c.dim);
    expect(`layers.${l}.ffn_norm`, b.ffnNorm.length, c.dim);
    for (const p of PROJECTIONS) {
      const lin = b.proj[p], [out, inF] = shape[p], name = `layers.${l}.${p}`;
      if (!lin) throw new QaloraError(`weights: ${name} is missing`);
      if (lin.out !== out || lin.in !== inF) throw new QaloraError(`weights: ${name} is [${lin.out}, ${lin.in}], expected [${out}, ${inF}]`);
      if (lin.kind === 'float') {
        expect(`${name}.weight`, lin.w.length, out * inF);
        continue;
      }
      const groups = inF / lin.settings.group;
      if (!Number.isInteger(groups)) throw new QaloraError(`weights: ${name}: group ${lin.settings.group} does not divide in_features ${inF}`);
      expect(`${name}.qweight`, lin.qweight.length, out * Math.ceil(inF / 32) * lin.settings.bits);
      expect(`${name}.alpha`, lin.alpha.length, out * groups);
      expect(`${name}.beta`, lin.beta.length, out * groups);
    }
  });
}

function checkShape(w: LlamaWeights, spec: ResolvedSpec): void {
  const m = spec.model;
  if (!m) return;
  const c = w.config;
  for (const k of ['dim', 'hidden', 'layers', 'heads', 'kvHeads', 'vocab'] as const) {
    if (m[k] !== c[k]) throw new QaloraError(`spec '${spec.name}' (${spec.file}) is for ${k} = ${m[k]}, the model has ${k} = ${c[k]}`);
  }
}

/** The spec's settings for each projection it names (model specs name layers by projection). */
export function layerSettings(spec: ResolvedSpec): Map<ProjectionName, ResolvedLayer> {
  const map = new Map<ProjectionName, ResolvedLayer>();
  for (const l of spec.layers) {
    const p = (l.projection ?? (PROJECTIONS.includes(l.name as ProjectionName) ? l.name : undefined)) as ProjectionName | undefined;
    if (p) map.set(p, l);
  }
  if (map.size === 0) throw new QaloraError(`spec '${spec.name}' (${spec.file}) names no model projection (q, k, v, o, gate, up, down)`);
  return map;
}

/** Each block's projections with the spec's settings; returns the linear the layer becomes. */
export function mapProjections(weights: LlamaWeights, layers: Map<ProjectionName, ResolvedLayer>, fn: (lin: Linear, s: ResolvedLayer, l: number, p: ProjectionName) => Linear): LlamaWeights {
  const blocks: BlockWeights[] = weights.blocks.map((blk, l) => {
    const proj = { ...blk.proj };
    for (const p of PROJECTIONS) {
      const s = layers.get(p);
      if (!s) continue;
      const lin = blk.proj[p], where = `layers.${l}.${p}`;
      if (lin.in !== s.inFeatures || lin.out !== s.outFeatures) {
        throw new QaloraError(`${where}: the model's layer is [${lin.out}, ${lin.in}] but the spec's '${s.name}' is [${s.outFeatures}, ${s.inFeatures}]`);
      }
      if (lin.in % s.group !== 0) throw new QaloraError(`${where}: group ${s.group} does not divide in_features ${lin.in}`);
      if (lin.kind === 'quant') {
        const q = lin.settings;
        if (q.bits !== s.bits || q.group !== s.group) {
          throw new QaloraError(`${where}: the layer is already quantized at ${q.bits} bits, group ${q.group}; the spec asks for ${s.bits} bits, group ${s.group}`);
        }
        proj[p] = { ...lin, settings: settingsOf(s) };
        continue;
      }
      proj[p] = fn(lin, s, l, p);
    }
    return { ...blk, proj };
  });
  return { ...weights, blocks };
}

export function settingsOf(s: ResolvedLayer): QuantLinear['settings'] {
  return { bits: s.bits, group: s.group, rank: s.rank, alpha: s.alpha, dropout: s.dropout, pool: s.pool, dtype: s.dtype };
}

export function emptyQuant(out: number, inF: number, s: ResolvedLayer): QuantLinear {
  const words = Math.ceil(inF / 32) * s.bits, groups = inF / s.group;
  return {
    kind: 'quant', out, in: inF, settings: settingsOf(s),
    qweight: new Uint32Array(out * words), alpha: new Float32Array(out * groups), beta: new Float32Array(out * groups),
  };
}

function quantizeRtn(weights: LlamaWeights, layers: Map<ProjectionName, ResolvedLayer>, native: NativeOps, onProgress?: CreateOptions['onProgress']): LlamaWeights {
  const total = weights.blocks.length * layers.size;
  let done = 0;
  return mapProjections(weights, layers, (lin, s, l, p) => {
    if (lin.kind !== 'float') throw new Error('unreachable');
    const q = emptyQuant(lin.out, lin.in, s);
    const k = native.kernels[specializationId(s)];
    if (!k) throw new QaloraError(`no ${native.backend} kernels for ${specializationId(s)} (layer ${s.name})`);
    k.quantize(lin.w, lin.out, lin.in, q.qweight, q.alpha, q.beta);
    onProgress?.(++done, total, `layers.${l}.${p}`);
    return q;
  });
}
