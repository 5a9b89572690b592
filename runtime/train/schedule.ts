// Learning-rate schedules: constant (the QA-LoRA reference's), cosine and linear decay, each after a linear
// warmup. Steps count from 1.
import { QaloraError } from '../errors.ts';

export type ScheduleName = 'constant' | 'cosine' | 'linear';
export const SCHEDULES: readonly ScheduleName[] = ['constant', 'cosine', 'linear'];

export interface ScheduleOptions {
  name: ScheduleName;
  lr: number;
  warmupSteps: number;
  totalSteps: number;
  /** Cosine/linear end at lr · minRatio (default 0). */
  minRatio?: number;
}

export function learningRate(step: number, o: ScheduleOptions): number {
  if (!SCHEDULES.includes(o.name)) throw new QaloraError(`unknown schedule '${o.name}' (expected ${SCHEDULES.join(', ')})`);
  if (o.warmupSteps > 0 && step <= o.warmupSteps) return (o.lr * step) / o.warmupSteps;
  if (o.name === 'constant') return o.lr;
  const min = o.lr * (o.minRatio ?? 0);
  const span = Math.max(1, o.totalSteps - o.warmupSteps);
  const progress = Math.min(1, Math.max(0, (step - o.warmupSteps) / span));
  if (o.name === 'linear') return min + (o.lr - min) * (1 - progress);
  return min + (o.lr - min) * 0.5 * (1 + Math.cos(Math.PI * progress));
}
