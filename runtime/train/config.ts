// Training configuration: defaults (from the QA-LoRA reference, scaled to the model), an optional YAML/JSON
// file, and command-line flags on top (flags win). Keys are accepted in camelCase or kebab-case.
import { readFileSync } from 'node:fs';
import YAML from 'yaml';
import { QaloraError } from '../errors.ts';
import { SCHEDULES, type ScheduleName } from './schedule.ts';
import { TABLE_TYPES } from '../../dsl/defaults.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { CHECKPOINTING, type Checkpointing } from '../model/runner.ts';

export interface TrainConfig {
  model: string;
  tokenizer?: string;
  spec?: string;
  data: string;
  /** Force a data format (text, jsonl-text, alpaca, chat); detected otherwise. */
  format?: 'text' | 'jsonl-text' | 'alpaca' | 'chat';
  separator?: string;
  /** Chat data: a Jinja template file, or a tokenizer_config.json with `chat_template` (default: the model's own). */
  chatTemplate?: string;
  out: string;
  resume: boolean;
  lr?: number;
  schedule: ScheduleName;
  /** Warmup: steps when ≥ 1, a fraction of the total steps when < 1 (the reference uses 0.03). */
  warmup: number;
  batchSize: number;
  gradAccum: number;
  maxSteps?: number;
  epochs?: number;
  seqLen?: number;
  valFraction: number;
  /** Validation windows per evaluation (0: all). */
  evalWindows: number;
  evalEvery: number;
  saveEvery: number;
  seed: number;
  maxGradNorm: number;
  weightDecay: number;
  /** Override the spec's LoRA dropout. */
  dropout?: number;
  backend: 'cpu' | 'cuda' | 'emu';
  quiet: boolean;
  /** Re-quantize file blocks that differ from the spec (lossy) instead of failing. */
  requantize?: boolean;
  /** The token tables' type (`--tables`, over the spec's `tables`). */
  tables?: TableType;
  /** Recompute each block in backward ('on'), keep its activations ('off'), or keep them when they fit ('auto'). */
  gradientCheckpointing: Checkpointing;
}

export const TRAIN_DEFAULTS: Omit<TrainConfig, 'model' | 'data' | 'out'> = {
  resume: false,
  schedule: 'constant',
  warmup: 0.03,
  batchSize: 4,
  gradAccum: 1,
  valFraction: 0.05,
  evalWindows: 0,
  evalEvery: 50,
  saveEvery: 100,
  seed: 42,
  maxGradNorm: 0.3,
  weightDecay: 0,
  backend: 'cpu',
  quiet: false,
  gradientCheckpointing: 'auto',
};

/**
 * The reference fine-tunes 7B models (dim 4096) at lr 2e-4. Smaller models take larger steps: scale by
 * sqrt(4096/dim), capped at 3e-3 (stories260K, dim 64, gets 1.6e-3).
 */
export function defaultLearningRate(dim: number): number {
  return Math.min(3e-3, 2e-4 * Math.sqrt(4096 / Math.max(1, dim)));
}

const NUMBER_KEYS = ['lr', 'warmup', 'batchSize', 'gradAccum', 'maxSteps', 'epochs', 'seqLen', 'valFraction', 'evalWindows',
  'evalEvery', 'saveEvery', 'seed', 'maxGradNorm', 'weightDecay', 'dropout'] as const;
const STRING_KEYS = ['model', 'tokenizer', 'spec', 'data', 'format', 'separator', 'chatTemplate', 'out', 'schedule', 'backend', 'tables',
  'gradientCheckpointing'] as const;
const BOOL_KEYS = ['resume', 'quiet', 'requantize'] as const;
const ALL_KEYS = new Set<string>([...NUMBER_KEYS, ...STRING_KEYS, ...BOOL_KEYS]);

function camel(k: string): string {
  return k.replace(/[-_]([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** Reads a YAML or JSON config file into (unvalidated) config keys. */
export function readConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new QaloraError(`${path}: cannot read config file (${(e as Error).message})`);
  }
  let raw: unknown;
  try {
    raw = path.endsWith('.json') ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new QaloraError(`${path}: not valid ${path.endsWith('.json') ? 'JSON' : 'YAML'} (${(e as Error).message})`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new QaloraError(`${path}: config must be a mapping of keys to values`);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) {
    const key = camel(k);
    if (!ALL_KEYS.has(key)) {
      const near = [...ALL_KEYS].find((c) => c.toLowerCase() === key.toLowerCase().replace(/[-_]/g, ''));
      throw new QaloraError(`${path}: unknown key '${k}'${near ? ` (did you mean '${near}'?)` : ''}; known keys: ${[...ALL_KEYS].join(', ')}`);
    }
    out[key] = v;
  }
  return out;
}

/** Defaults < config file < flags; every value checked, errors name the key and where it came from. */
export function resolveTrainConfig(fileValues: Record<string, unknown>, flags: Record<string, unknown>, fileName = 'config'): TrainConfig {
  const merged: Record<string, unknown> = { ...TRAIN_DEFAULTS };
  const origin: Record<string, string> = {};
  for (const [src, vals] of [[fileName, fileValues], ['command line', flags]] as const) {
    for (const [k, v] of Object.entries(vals)) {
      if (v === undefined) continue;
      merged[k] = v;
      origin[k] = src;
    }
  }
  const kebab = (k: string) => k.replace(/[A-Z]/g, (ch) => '-' + ch.toLowerCase());
  const where = (k: string) => (origin[k] === 'command line' ? `--${kebab(k)}` : `${kebab(k)} (in ${origin[k] ?? 'the defaults'})`);
  for (const k of NUMBER_KEYS) {
    const v = merged[k];
    if (v === undefined) continue;
    const n = typeof v === 'string' ? Number(v) : v;
    if (typeof n !== 'number' || !Number.isFinite(n)) throw new QaloraError(`${where(k)}: expected a number, got ${JSON.stringify(v)}`);
    merged[k] = n;
  }
  for (const k of BOOL_KEYS) merged[k] = merged[k] === true || merged[k] === 'true';
  for (const k of ['model', 'data', 'out'] as const) {
    if (typeof merged[k] !== 'string' || !(merged[k] as string)) throw new QaloraError(`missing required setting '${k}' (--${k} or '${k}:' in the config file)`);
  }
  const c = merged as unknown as TrainConfig;
  const positiveInt = (k: keyof TrainConfig, allowZero = false) => {
    const v = c[k] as number | undefined;
    if (v === undefined) return;
    if (!Number.isInteger(v) || v < (allowZero ? 0 : 1)) throw new QaloraError(`${where(k)}: expected ${allowZero ? 'a non-negative' : 'a positive'} integer, got ${v}`);
  };
  positiveInt('batchSize'); positiveInt('gradAccum'); positiveInt('maxSteps'); positiveInt('seqLen');
  positiveInt('evalEvery', true); positiveInt('saveEvery', true); positiveInt('evalWindows', true); positiveInt('seed', true);
  if (c.lr !== undefined && !(c.lr > 0)) throw new QaloraError(`${where('lr')}: must be > 0, got ${c.lr}`);
  if (c.epochs !== undefined && !(c.epochs > 0)) throw new QaloraError(`${where('epochs')}: must be > 0, got ${c.epochs}`);
  if (!(c.warmup >= 0)) throw new QaloraError(`${where('warmup')}: must be ≥ 0, got ${c.warmup}`);
  if (!(c.maxGradNorm >= 0)) throw new QaloraError(`${where('maxGradNorm')}: must be ≥ 0 (0 disables clipping), got ${c.maxGradNorm}`);
  if (!(c.valFraction >= 0 && c.valFraction < 1)) throw new QaloraError(`${where('valFraction')}: must be in [0, 1), got ${c.valFraction}`);
  if (c.dropout !== undefined && !(c.dropout >= 0 && c.dropout < 1)) throw new QaloraError(`${where('dropout')}: must be in [0, 1), got ${c.dropout}`);
  if (!SCHEDULES.includes(c.schedule)) throw new QaloraError(`${where('schedule')}: unknown schedule '${c.schedule}' (expected ${SCHEDULES.join(', ')})`);
  if (!['cpu', 'cuda', 'emu'].includes(c.backend)) throw new QaloraError(`${where('backend')}: expected cpu, cuda or emu, got '${c.backend}'`);
  if (!CHECKPOINTING.includes(c.gradientCheckpointing)) throw new QaloraError(`${where('gradientCheckpointing')}: expected ${CHECKPOINTING.join(', ')}, got '${c.gradientCheckpointing}'`);
  if (c.tables !== undefined && !TABLE_TYPES.includes(c.tables)) throw new QaloraError(`${where('tables')}: expected one of ${TABLE_TYPES.join(', ')}, got '${c.tables}'`);
  return c;
}
