// Checkpoints: the adapters (PEFT format), the optimizer's moments, and the trainer state (step, data position,
// seeds) in one directory, written beside the target and swapped in by rename so a kill never leaves a half
// checkpoint. Everything needed to continue bit-exactly is here; nothing depends on wall-clock or process state.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { loadPeftAdapter, replaceDir, savePeftAdapter, type AdapterInfo } from '../adapters/peft.ts';
import { QaloraError } from '../errors.ts';
import type { AdapterSet } from '../model/types.ts';
import { asF32, readSafetensors, tensorOf, writeFileAtomic, writeSafetensors, type SafeTensor } from '../safetensors.ts';
import type { AdamW } from './adamw.ts';
import { paramList } from './params.ts';

export const STATE_FILE = 'trainer_state.json';
export const OPTIMIZER_FILE = 'optimizer.safetensors';

export interface TrainerState {
  version: 1;
  /** Optimizer steps completed. */
  step: number;
  /** Training windows consumed so far (the data position); the order is a function of (seed, epoch). */
  position: number;
  /** Adam's update count (equals step unless a run changed it). */
  adamT: number;
  /** The run's seed; dropout seeds per micro-batch and epoch orders are derived from it and the step. */
  seed: number;
  tokensSeen: number;
  elapsedSeconds: number;
  /** What must not change across a resume for the continuation to be exact. */
  fingerprint: Record<string, string | number>;
  totalSteps: number;
}

export function saveCheckpoint(dir: string, adapters: AdapterSet, info: AdapterInfo, opt: AdamW, state: TrainerState): void {
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  savePeftAdapter(tmp, adapters, info);
  const tensors = new Map<string, SafeTensor>();
  opt.params.forEach((p, k) => {
    tensors.set(`${p.key}.m`, tensorOf('F32', [opt.m[k].length], opt.m[k]));
    tensors.set(`${p.key}.v`, tensorOf('F32', [opt.v[k].length], opt.v[k]));
  });
  writeSafetensors(join(tmp, OPTIMIZER_FILE), tensors, { adam_t: String(opt.t) });
  writeFileAtomic(join(tmp, STATE_FILE), [Buffer.from(JSON.stringify(state, null, 2) + '\n')]);
  replaceDir(tmp, dir);
}

export function hasCheckpoint(dir: string): boolean {
  recoverSwap(dir);
  return existsSync(join(dir, STATE_FILE));
}

/**
 * replaceDir moves the previous checkpoint aside (`<dir>.old-<pid>`) before renaming the new one in; a process
 * killed between the two renames leaves no `<dir>`, only that complete previous checkpoint: put it back.
 */
function recoverSwap(dir: string): void {
  if (existsSync(dir) || !existsSync(dirname(dir))) return;
  const prefix = `${basename(dir)}.old-`;
  const aside = readdirSync(dirname(dir)).find((n) => n.startsWith(prefix) && existsSync(join(dirname(dir), n, STATE_FILE)));
  if (aside) renameSync(join(dirname(dir), aside), dir);
}

/** Restores adapters (in place, into the model's arrays) and the optimizer; returns the trainer state. */
export function loadCheckpoint(dir: string, adapters: AdapterSet, opt: AdamW): TrainerState {
  if (!hasCheckpoint(dir)) throw new QaloraError(`${dir}: no checkpoint to resume from (${STATE_FILE} missing)`);
  const state = JSON.parse(readFileSync(join(dir, STATE_FILE), 'utf8')) as TrainerState;
  const saved = loadPeftAdapter(dir, { warn: () => {} }).adapters;
  for (const p of paramList(adapters)) {
    const src = saved[p.block]?.[p.proj]?.[p.which];
    if (!src || src.length !== p.data.length) throw new QaloraError(`${dir}: checkpoint has no adapter matching ${p.key} (${p.data.length} values)`);
    p.data.set(src);
  }
  const st = readSafetensors(join(dir, OPTIMIZER_FILE));
  opt.params.forEach((p, k) => {
    const m = st.tensors.get(`${p.key}.m`), v = st.tensors.get(`${p.key}.v`);
    if (!m || !v || m.shape[0] !== p.data.length || v.shape[0] !== p.data.length) {
      throw new QaloraError(`${dir}/${OPTIMIZER_FILE}: optimizer state for ${p.key} is missing or the wrong size`);
    }
    opt.m[k].set(asF32(m));
    opt.v[k].set(asF32(v));
  });
  opt.t = Number(st.metadata.adam_t ?? state.adamT);
  return state;
}
