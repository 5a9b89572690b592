// Adapters in Hugging Face PEFT's on-disk format: adapter_config.json + adapter_model.safetensors with PEFT's key
// names. QA-LoRA adapters (use_qalora: true) have A of shape [r, in/g]; plain LoRA adapters (for comparison
// runs on a float base) have A [r, in]. Our files also record the pooling convention, because PEFT's own
// QA-LoRA pools differently from the reference code (notes §1): a file without `qalora_pooling` and with
// use_qalora is PEFT's, so it is read as 'peft' pooling.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Pool } from '../../dsl/resolved.ts';
import { PROJECTIONS } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { Adapter, AdapterSet, LlamaConfig, ProjectionName } from '../model/types.ts';
import { asF32, f32To16, readSafetensors, tensorOf, writeFileAtomic, writeSafetensors, type SafeTensor } from '../safetensors.ts';

export const CONFIG_FILE = 'adapter_config.json';
export const WEIGHTS_FILE = 'adapter_model.safetensors';

const MODULE: Record<ProjectionName, string> = {
  q: 'self_attn.q_proj', k: 'self_attn.k_proj', v: 'self_attn.v_proj', o: 'self_attn.o_proj',
  gate: 'mlp.gate_proj', up: 'mlp.up_proj', down: 'mlp.down_proj',
};
const PROJ_OF_TARGET = Object.fromEntries(PROJECTIONS.map((p) => [`${p}_proj`, p])) as Record<string, ProjectionName>;

export function peftKey(block: number, proj: ProjectionName, which: 'A' | 'B'): string {
  return `base_model.model.model.layers.${block}.${MODULE[proj]}.lora_${which}.weight`;
}

export type AdapterKind = 'qalora' | 'lora';

export interface AdapterInfo {
  kind: AdapterKind;
  /** Group size per projection (QA-LoRA only). */
  groups: Partial<Record<ProjectionName, number>>;
  pool: Pool;
  dropout: number;
  /** Bits of the base the adapter was trained on (informational). */
  bits?: number;
  baseModel?: string;
}

export interface LoadedAdapter extends AdapterInfo {
  adapters: AdapterSet;
  config: Record<string, unknown>;
}

// Fields of PEFT's LoraConfig (and PeftConfig) that we know; anything else gets a warning, not an error.
const KNOWN_FIELDS = new Set([
  'peft_type', 'r', 'lora_alpha', 'lora_dropout', 'target_modules', 'task_type', 'use_qalora', 'qalora_group_size',
  'qalora_pooling', 'qalora_group_size_pattern', 'qalora_bits', 'rank_pattern', 'alpha_pattern', 'bias',
  'base_model_name_or_path', 'fan_in_fan_out', 'inference_mode', 'init_lora_weights', 'layers_to_transform',
  'layers_pattern', 'modules_to_save', 'revision', 'use_rslora', 'use_dora', 'auto_mapping', 'megatron_config',
  'megatron_core', 'loftq_config', 'layer_replication', 'runtime_config', 'exclude_modules', 'lora_bias',
  'eva_config', 'corda_config', 'trainable_token_indices', 'target_parameters', 'peft_version',
]);

/** The rank and alpha most layers use, and per-module exceptions in PEFT's rank_pattern/alpha_pattern form. */
function commonAndPattern(values: Map<ProjectionName, number>): { common: number; pattern: Record<string, number> } {
  const counts = new Map<number, number>();
  for (const v of values.values()) counts.set(v, (counts.get(v) ?? 0) + 1);
  const common = [...counts.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] ?? 0;
  const pattern: Record<string, number> = {};
  for (const [p, v] of values) if (v !== common) pattern[`${p}_proj`] = v;
  return { common, pattern };
}

/**
 * Writes an adapter directory atomically (files renamed into place; the directory is created if needed), its
 * tensors in F32 or rounded to F16/BF16 (what engines serving fp16 models load).
 */
export function savePeftAdapter(dir: string, adapters: AdapterSet, info: AdapterInfo, extra: Record<string, unknown> = {}, dtype: 'F32' | 'F16' | 'BF16' = 'F32'): void {
  mkdirSync(dir, { recursive: true });
  const tensors = new Map<string, SafeTensor>();
  const tensor = (shape: number[], data: Float32Array) => (dtype === 'F32' ? tensorOf('F32', shape, data) : f32To16(dtype, shape, data));
  const ranks = new Map<ProjectionName, number>(), alphas = new Map<ProjectionName, number>();
  adapters.forEach((block, i) => {
    for (const p of PROJECTIONS) {
      const ad = block?.[p];
      if (!ad || ad.rank === 0) continue;
      const cols = ad.a.length / ad.rank;
      const out = ad.b.length / ad.rank;
      if (!Number.isInteger(cols) || !Number.isInteger(out)) throw new QaloraError(`adapter layers.${i}.${p}: A/B sizes ${ad.a.length}/${ad.b.length} are not multiples of rank ${ad.rank}`);
      tensors.set(peftKey(i, p, 'A'), tensor([ad.rank, cols], ad.a));
      tensors.set(peftKey(i, p, 'B'), tensor([out, ad.rank], ad.b));
      if (ranks.has(p) && (ranks.get(p) !== ad.rank || alphas.get(p) !== ad.alpha)) {
        throw new QaloraError(`adapter ${p}_proj: rank/alpha differ between blocks, which PEFT's config cannot express`);
      }
      ranks.set(p, ad.rank);
      alphas.set(p, ad.alpha);
    }
  });
  if (tensors.size === 0) throw new QaloraError('no adapters to save (every layer has rank 0)');
  const r = commonAndPattern(ranks), a = commonAndPattern(alphas);
  const targets = PROJECTIONS.filter((p) => ranks.has(p)).map((p) => `${p}_proj`);
  const config: Record<string, unknown> = {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    r: r.common,
    lora_alpha: a.common,
    rank_pattern: r.pattern,
    alpha_pattern: a.pattern,
    lora_dropout: info.dropout,
    target_modules: targets,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    base_model_name_or_path: info.baseModel ?? null,
    use_qalora: info.kind === 'qalora',
  };
  if (info.kind === 'qalora') {
    const g = commonAndPattern(new Map(Object.entries(info.groups) as [ProjectionName, number][]));
    config.qalora_group_size = g.common;
    if (Object.keys(g.pattern).length) config.qalora_group_size_pattern = g.pattern;
    config.qalora_pooling = info.pool;
    if (info.bits !== undefined) config.qalora_bits = info.bits;
  }
  Object.assign(config, extra);
  writeSafetensors(join(dir, WEIGHTS_FILE), tensors, { format: 'pt' });
  writeFileAtomic(join(dir, CONFIG_FILE), [Buffer.from(JSON.stringify(config, null, 2) + '\n')]);
}

export interface LoadOptions {
  /** Check every tensor's shape against this model (and the groups against `groups`). */
  model?: LlamaConfig;
  warn?: (message: string) => void;
}

function num(config: Record<string, unknown>, key: string, where: string, fallback?: number): number {
  const v = config[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new QaloraError(`${where}: '${key}' must be a number, got ${JSON.stringify(v)}`);
  return v;
}

/** Reads a PEFT adapter directory (ours or PEFT's), validating names and shapes against each other and the model. */
export function loadPeftAdapter(dir: string, opts: LoadOptions = {}): LoadedAdapter {
  const warn = opts.warn ?? ((m: string) => process.stderr.write(`warning: ${m}\n`));
  const cfgPath = join(dir, CONFIG_FILE), wPath = join(dir, WEIGHTS_FILE);
  if (!existsSync(cfgPath)) throw new QaloraError(`${dir}: not an adapter directory (no ${CONFIG_FILE})`);
  if (!existsSync(wPath)) throw new QaloraError(`${dir}: no ${WEIGHTS_FILE} (adapter_model.bin pickles are not supported; convert to safetensors)`);
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(cfgPath, 'utf8'));
  } catch (e) {
    throw new QaloraError(`${cfgPath}: not valid JSON (${(e as Error).message})`);
  }
  const unknown = Object.keys(config).filter((k) => !KNOWN_FIELDS.has(k));
  if (unknown.length) warn(`${cfgPath}: ignoring unknown field${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}`);
  if (config.peft_type !== 'LORA') throw new QaloraError(`${cfgPath}: peft_type is ${JSON.stringify(config.peft_type)}; only LORA adapters are supported`);
  if (config.use_dora) throw new QaloraError(`${cfgPath}: DoRA adapters (use_dora) are not supported`);
  if (config.bias && config.bias !== 'none') throw new QaloraError(`${cfgPath}: bias '${config.bias}' is not supported (only 'none')`);
  const kind: AdapterKind = config.use_qalora ? 'qalora' : 'lora';
  const r = num(config, 'r', cfgPath), alpha = num(config, 'lora_alpha', cfgPath);
  const rankPattern = (config.rank_pattern ?? {}) as Record<string, number>;
  const alphaPattern = (config.alpha_pattern ?? {}) as Record<string, number>;
  const groupPattern = (config.qalora_group_size_pattern ?? {}) as Record<string, number>;
  const group = kind === 'qalora' ? num(config, 'qalora_group_size', cfgPath, 16) : 0;
  const rslora = config.use_rslora === true;
  const pool = (config.qalora_pooling ?? 'peft') as Pool;
  if (!['mean', 'sum', 'peft'].includes(pool)) throw new QaloraError(`${cfgPath}: qalora_pooling must be mean, sum or peft, got ${JSON.stringify(pool)}`);
  // A pattern key may be 'q_proj' or a longer module path ending in it; the most specific match wins.
  const lookup = (pattern: Record<string, number>, block: number, proj: ProjectionName, dflt: number) => {
    const full = `model.layers.${block}.${MODULE[proj]}`;
    let best: [number, number] | null = null;
    for (const [k, v] of Object.entries(pattern)) {
      if (full === k || full.endsWith(`.${k}`) || k.endsWith(full)) if (!best || k.length > best[0]) best = [k.length, v];
    }
    return best ? best[1] : dflt;
  };

  const st = readSafetensors(wPath);
  const adapters: AdapterSet = [];
  const groups: Partial<Record<ProjectionName, number>> = {};
  const seen = new Set<string>();
  const re = /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])(?:\.default)?\.weight$/;
  for (const name of st.tensors.keys()) {
    const m = re.exec(name);
    if (!m) throw new QaloraError(`${wPath}: unexpected tensor '${name}' (expected base_model.model.model.layers.N.{self_attn,mlp}.X_proj.lora_{A,B}.weight)`);
    const block = Number(m[1]);
    const proj = PROJ_OF_TARGET[`${m[3]}_proj`];
    if (!proj || !MODULE[proj].startsWith(m[2])) throw new QaloraError(`${wPath}: tensor '${name}' names an unknown projection`);
    if (m[4] === 'B') continue;
    seen.add(name);
    const bName = name.replace('lora_A', 'lora_B');
    const ta = st.tensors.get(name)!, tb = st.tensors.get(bName);
    if (!tb) throw new QaloraError(`${wPath}: '${name}' has no matching '${bName}'`);
    seen.add(bName);
    const rank = lookup(rankPattern, block, proj, r);
    const a = lookup(alphaPattern, block, proj, alpha);
    if (ta.shape.length !== 2 || ta.shape[0] !== rank) throw new QaloraError(`${wPath}: '${name}' has shape [${ta.shape}], expected [${rank}, …] (r = ${rank})`);
    if (tb.shape.length !== 2 || tb.shape[1] !== rank) throw new QaloraError(`${wPath}: '${bName}' has shape [${tb.shape}], expected [out, ${rank}]`);
    const ad: Adapter = { rank, alpha: rslora ? (a * rank) / Math.sqrt(rank) : a, a: asF32(ta).slice(), b: asF32(tb).slice() };
    if (opts.model) checkShape(opts.model, block, proj, ta.shape[1], tb.shape[0], kind, `${wPath}: '${name}'`);
    if (kind === 'qalora') {
      const g = lookup(groupPattern, block, proj, group);
      groups[proj] = g;
      if (opts.model) {
        const inF = inFeatures(opts.model, proj);
        if (inF / g !== ta.shape[1]) throw new QaloraError(`${wPath}: '${name}' has ${ta.shape[1]} columns but ${proj}_proj with group ${g} pools ${inF} inputs into ${inF / g}`);
      }
    }
    while (adapters.length <= block) adapters.push({});
    adapters[block][proj] = ad;
  }
  for (const name of st.tensors.keys()) if (!seen.has(name)) throw new QaloraError(`${wPath}: '${name}' has no matching lora_A tensor`);
  if (opts.model && adapters.length > opts.model.layers) {
    throw new QaloraError(`${wPath}: adapters for block ${adapters.length - 1} but the model has ${opts.model.layers} blocks`);
  }
  if (opts.model) while (adapters.length < opts.model.layers) adapters.push({});
  return {
    kind, groups, pool, adapters, config,
    dropout: typeof config.lora_dropout === 'number' ? config.lora_dropout : 0,
    bits: typeof config.qalora_bits === 'number' ? config.qalora_bits : undefined,
    baseModel: typeof config.base_model_name_or_path === 'string' ? config.base_model_name_or_path : undefined,
  };
}

export function inFeatures(c: LlamaConfig, p: ProjectionName): number {
  return p === 'down' ? c.hidden : p === 'o' ? (c.dim / c.heads) * c.heads : c.dim;
}
export function outFeatures(c: LlamaConfig, p: ProjectionName): number {
  const headDim = c.dim / c.heads;
  if (p === 'k' || p === 'v') return headDim * c.kvHeads;
  if (p === 'gate' || p === 'up') return c.hidden;
  return c.dim;
}

function checkShape(c: LlamaConfig, block: number, p: ProjectionName, aCols: number, bRows: number, kind: AdapterKind, where: string): void {
  if (block >= c.layers) throw new QaloraError(`${where}: block ${block} but the model has ${c.layers}`);
  const inF = inFeatures(c, p), outF = outFeatures(c, p);
  if (bRows !== outF) throw new QaloraError(`${where}: lora_B has ${bRows} rows but ${p}_proj has ${outF} outputs`);
  if (kind === 'lora' && aCols !== inF) throw new QaloraError(`${where}: lora_A has ${aCols} columns but ${p}_proj has ${inF} inputs (a plain LoRA adapter)`);
}

/** Replaces `dir` by `tmpDir` as atomically as directories allow (rename aside, rename in, remove the old). */
export function replaceDir(tmpDir: string, dir: string): void {
  const old = `${dir}.old-${process.pid}`;
  if (existsSync(dir)) renameSync(dir, old);
  renameSync(tmpDir, dir);
  rmSync(old, { recursive: true, force: true });
}
