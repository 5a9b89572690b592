// Turning loaded weights into what a LlamaModel runs: the native ops loaded, float projections quantized into
// the spec's layout (round-to-nearest here, or GPTQ on calibration activations), adapters initialised or checked.
import { PROJECTIONS, type Bits, type QaloraSettings, type ResolvedLayer, type ResolvedSpec } from '../../dsl/resolved.ts';
import type { CreateOptions } from './llama.ts';
import type { AdapterSet, BackendName, FileLinear, FloatLinear, Linear, LlamaWeights, LoadedLinear, ProjectionName, QuantLinear } from './types.ts';
import { tableSize } from './types.ts';
import { DEFAULT_CUDA_ARCHS, DEFAULT_SETTINGS } from '../../dsl/defaults.ts';
import { createHash } from 'node:crypto';
import { loadNativeOps, specializationId, type NativeOps } from './native-ops.ts';
import { checkAdapters, initAdapters } from './adapters.ts';
import { QaloraError } from '../errors.ts';
import { denseWeight } from './dense.ts';
import { newScales, scalesOf, withScales } from './scales.ts';
import { withTableTypes } from './tables.ts';

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

export async function prepareWeights(file: LlamaWeights<LoadedLinear>, opts: CreateOptions): Promise<Prepared> {
  checkConfig(file);
  // A quantized model (GGUF blocks, GPTQ, our base file) without a spec runs with the settings it carries.
  const spec = opts.spec ?? specOfQuantized(file, opts.backend, opts.inferred);
  if (spec) checkShape(file, spec);
  // Token tables first: their kernels (a table in blocks runs through the rank-0 QA-LoRA kernels) join the build.
  const loaded = withTableTypes(file, opts.tables ? { embedding: opts.tables, classifier: opts.tables } : spec?.tables);
  const native = await loadNativeOps(nativeSpec(spec, loaded), opts.backend);
  const layers = spec ? layerSettings(spec) : new Map<ProjectionName, ResolvedLayer>();
  let out: LlamaWeights;
  if (spec && opts.quantize === 'gptq') {
    // GPTQ runs the float model on calibration data: every projection it quantizes is needed in fp32 at once.
    const { quantizeGptq } = await import('./gptq-calib.ts');
    out = await quantizeGptq(resolveFileLinears(loaded, layers, opts, () => null), layers, native, opts);
  } else {
    const total = loaded.blocks.length * layers.size;
    let done = 0;
    // One tensor at a time: a float projection is read, quantized and dropped before the next is read.
    out = resolveFileLinears(loaded, layers, opts, (w, lin, s, where) => {
      const q = emptyQuant(lin.out, lin.in, s);
      const k = native.kernels[specializationId(s)];
      if (!k) throw new QaloraError(`no ${native.backend} kernels for ${specializationId(s)} (layer ${s.name})`);
      k.quantize(w, lin.out, lin.in, q.qweight, q.alpha, q.beta);
      opts.onProgress?.(++done, total, where);
      return q;
    });
  }
  const adapters = opts.adapters ?? initAdapters(out, opts.seed ?? 0);
  checkAdapters(out, adapters);
  return { spec, weights: out, adapters, native };
}

/**
 * Every projection in its final form. A projection the spec names: quant layers are kept (and checked); file
 * blocks that are the spec's bits and group are read as the base exactly; blocks of other bits or group are an
 * error naming both, unless `requantize`; float weights are read in fp32 and handed to `quantize` (null: keep
 * them float, for GPTQ). A projection the spec does not name is read in fp32.
 */
function resolveFileLinears(
  loaded: LlamaWeights<LoadedLinear>, layers: Map<ProjectionName, ResolvedLayer>, opts: CreateOptions,
  quantize: (w: Float32Array, lin: FileLinear | FloatLinear, s: ResolvedLayer, where: string) => QuantLinear | null,
): LlamaWeights {
  const blocks = loaded.blocks.map((blk, l) => {
    const proj = {} as Record<ProjectionName, Linear>;
    for (const p of PROJECTIONS) {
      const lin = blk.proj[p], s = layers.get(p), where = `layers.${l}.${p}`;
      if (!s) {
        proj[p] = lin.kind === 'file' ? { kind: 'float', out: lin.out, in: lin.in, w: lin.readFloat() } : lin;
        continue;
      }
      checkLayerFits(lin, s, where);
      if (lin.kind === 'quant') {
        const q = lin.settings;
        if (q.bits !== s.bits || q.group !== s.group) {
          throw new QaloraError(`${where}: the layer is already quantized at ${q.bits} bits, group ${q.group}; the spec asks for ${s.bits} bits, group ${s.group}`);
        }
        const kept = keepScales(lin, s, where, opts.requantize);
        if (kept) {
          proj[p] = { ...kept, settings: settingsOf(s) };
          continue;
        }
        const w = denseWeight(lin);
        proj[p] = quantize(w, { kind: 'float', out: lin.out, in: lin.in, w }, s, where) ?? { kind: 'float', out: lin.out, in: lin.in, w };
        continue;
      }
      if (lin.kind === 'file' && lin.quant) {
        if (lin.quant.bits === s.bits && lin.quant.group === s.group) {
          const kept = keepScales(lin.quant.read(settingsOf(s)), s, where, opts.requantize);
          if (kept) {
            proj[p] = kept;
            continue;
          }
        } else if (!opts.requantize) {
          throw new QaloraError(`${lin.source} stores ${lin.fileType} blocks (${lin.quant.bits} bits, group ${lin.quant.group}) but the spec asks for ${s.bits} bits, group ${s.group} at ${where}; ` +
            `drop --spec to fine-tune the file's blocks as they are, or pass --requantize to dequantize and quantize again (lossy)`);
        }
      }
      const w = lin.kind === 'file' ? lin.readFloat() : lin.w;
      proj[p] = quantize(w, lin, s, where) ?? { kind: 'float', out: lin.out, in: lin.in, w };
    }
    return { ...blk, proj };
  });
  return { ...loaded, blocks };
}

/**
 * A stored base in the spec's scale storage: as it is, widened (fp16 → fp32, exact), or narrowed when every
 * α and β fits fp16 exactly. Scales that would round: null with `requantize` (the caller quantizes the
 * dequantized weight again), else an error naming both.
 */
function keepScales(lin: QuantLinear, s: ResolvedLayer, where: string, requantize?: boolean): QuantLinear | null {
  try {
    return withScales(lin, s.scales, where);
  } catch (e) {
    if (requantize && e instanceof QaloraError) return null;
    throw e;
  }
}

function checkLayerFits(lin: LoadedLinear, s: ResolvedLayer, where: string): void {
  if (lin.in !== s.inFeatures || lin.out !== s.outFeatures) {
    throw new QaloraError(`${where}: the model's layer is [${lin.out}, ${lin.in}] but the spec's '${s.name}' is [${s.outFeatures}, ${s.inFeatures}]`);
  }
  if (lin.in % s.group !== 0) throw new QaloraError(`${where}: group ${s.group} does not divide in_features ${lin.in}`);
}

/** The bits, group and scale storage a loaded projection already has (quant layers, exact file blocks); null for float. */
function storedQuant(lin: LoadedLinear): { bits: Bits; group: number; scales: QuantLinear['settings']['scales']; settings?: QuantLinear['settings'] } | null {
  if (lin.kind === 'quant') return { bits: lin.settings.bits, group: lin.settings.group, scales: scalesOf(lin.settings), settings: { ...lin.settings, scales: scalesOf(lin.settings) } };
  if (lin.kind === 'file' && lin.quant) return { bits: lin.quant.bits, group: lin.quant.group, scales: lin.quant.scales };
  return null;
}

/**
 * The spec a quantized model implies: each projection's bits, group and scale storage as stored (the same in
 * every block: GGUF blocks keep their fp16 d and m, `scales fp16`) and the adapter settings it carries, or
 * `inferred` over the defaults for file blocks (GGUF, which has none). Undefined for a float model.
 */
export function specOfQuantized(w: LlamaWeights<LoadedLinear>, backend: BackendName, inferred: Partial<QaloraSettings> = {}): ResolvedSpec | undefined {
  const layers: ResolvedLayer[] = [];
  for (const p of PROJECTIONS) {
    const first = w.blocks[0] ? storedQuant(w.blocks[0].proj[p]) : null;
    if (!first) {
      if (w.blocks.some((b) => storedQuant(b.proj[p]))) throw new QaloraError(`projection ${p} is quantized in some blocks only; give a spec (--spec)`);
      continue;
    }
    const settings: QuantLinear['settings'] = first.settings ?? { ...DEFAULT_SETTINGS, ...inferred, bits: first.bits, group: first.group, scales: first.scales };
    w.blocks.forEach((b, l) => {
      const q = storedQuant(b.proj[p]);
      const same = q && q.bits === first.bits && q.group === first.group && q.scales === first.scales &&
        (!q.settings || (Object.keys(settings) as Array<keyof QuantLinear['settings']>).every((k) => q.settings![k] === settings[k]));
      if (!same) throw new QaloraError(`layers.${l}.${p} is quantized differently from layers.0.${p}; give a spec (--spec)`);
    });
    const lin = w.blocks[0].proj[p];
    layers.push({ ...settings, name: p, projection: p, inFeatures: lin.in, outFeatures: lin.out, count: w.blocks.length });
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

/** One line per projection of an implied spec, for the user to see what runs (and copy into a spec file). */
export function describeSpec(spec: ResolvedSpec): string {
  return spec.layers.map((l) => `${l.name}: bits ${l.bits} group ${l.group} rank ${l.rank} alpha ${l.alpha} dropout ${l.dropout} pool ${l.pool} dtype ${l.dtype} scales ${l.scales}`).join('\n');
}

/**
 * The spec the native build needs: the model's spec plus the kernels of quantized token tables (a GGUF
 * embedding or classifier kept in its blocks runs through the rank-0 QA-LoRA kernels). The recorded spec
 * (model.spec, merged files' metadata) stays the model's own.
 */
function nativeSpec(spec: ResolvedSpec | undefined, w: LlamaWeights<LoadedLinear>): ResolvedSpec | undefined {
  const tables: ResolvedLayer[] = [];
  const add = (name: string, t: LlamaWeights<LoadedLinear>['tokEmbedding']) => {
    if (t instanceof Float32Array || t.kind === 'half') return;
    tables.push({ ...t.settings, name, inFeatures: t.in, outFeatures: t.out, count: 1 });
  };
  add('tok_embeddings', w.tokEmbedding);
  if (w.classifier !== w.tokEmbedding) add('classifier', w.classifier);
  if (tables.length === 0) return spec;
  const base: ResolvedSpec = spec ?? { name: 'tables', file: '<token tables>', layers: [], targets: { cpu: true, cuda: null } };
  return { ...base, layers: [...base.layers, ...tables] };
}

function checkConfig(w: LlamaWeights<LoadedLinear>): void {
  const c = w.config;
  if (c.dim % c.heads !== 0) throw new QaloraError(`dim ${c.dim} is not a multiple of heads ${c.heads}`);
  if (c.heads % c.kvHeads !== 0) throw new QaloraError(`heads ${c.heads} is not a multiple of kvHeads ${c.kvHeads}`);
  if ((c.dim / c.heads) % 2 !== 0) throw new QaloraError(`head size ${c.dim / c.heads} must be even for RoPE`);
  if (w.blocks.length !== c.layers) throw new QaloraError(`config says ${c.layers} layers, weights have ${w.blocks.length} blocks`);
  // Sizes are checked here, by tensor name, rather than by the native wrappers at the first call.
  const expect = (name: string, got: number, want: number) => {
    if (got !== want) throw new QaloraError(`weights: ${name} has ${got} values, expected ${want}`);
  };
  expect('tok_embeddings', tableSize(w.tokEmbedding), c.vocab * c.dim);
  expect('classifier', tableSize(w.classifier), c.vocab * c.dim);
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
      if (lin.kind === 'file') continue; // its reader checked the tensor against the file
      const groups = inF / lin.settings.group;
      if (!Number.isInteger(groups)) throw new QaloraError(`weights: ${name}: group ${lin.settings.group} does not divide in_features ${inF}`);
      expect(`${name}.qweight`, lin.qweight.length, out * Math.ceil(inF / 32) * lin.settings.bits);
      expect(`${name}.alpha`, lin.alpha.length, out * groups);
      expect(`${name}.beta`, lin.beta.length, out * groups);
    }
  });
}

function checkShape(w: LlamaWeights<LoadedLinear>, spec: ResolvedSpec): void {
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

export function settingsOf(s: ResolvedLayer): QuantLinear['settings'] {
  return { bits: s.bits, group: s.group, rank: s.rank, alpha: s.alpha, dropout: s.dropout, pool: s.pool, dtype: s.dtype, scales: scalesOf(s) };
}

export function emptyQuant(out: number, inF: number, s: ResolvedLayer): QuantLinear {
  const words = Math.ceil(inF / 32) * s.bits, groups = inF / s.group;
  return {
    kind: 'quant', out, in: inF, settings: settingsOf(s),
    qweight: new Uint32Array(out * words), alpha: newScales(scalesOf(s), out * groups), beta: newScales(scalesOf(s), out * groups),
  };
}
