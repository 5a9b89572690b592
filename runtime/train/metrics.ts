// The run's metrics log (metrics.jsonl): one JSON object per line, train steps and evaluations interleaved.
// On resume, lines after the checkpoint's step are dropped so the log reads as one uninterrupted run.
import { appendFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';

export interface TrainRecord {
  kind: 'train';
  step: number;
  /** Mean cross-entropy over the step's counted targets. */
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  epoch: number;
  elapsed: number;
}
export interface EvalRecord {
  kind: 'eval';
  step: number;
  valLoss: number;
  valPerplexity: number;
  valTokens: number;
}
export type MetricRecord = TrainRecord | EvalRecord;

export class MetricsLog {
  constructor(readonly path: string) {}

  append(r: MetricRecord): void {
    appendFileSync(this.path, JSON.stringify(r) + '\n');
  }

  read(): MetricRecord[] {
    if (!existsSync(this.path)) return [];
    return readFileSync(this.path, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as MetricRecord);
  }

  /** Keeps only records up to `step` (a checkpoint), or starts empty. */
  truncateAfter(step: number): void {
    const keep = this.read().filter((r) => r.step <= step);
    writeFileSync(this.path, keep.map((r) => JSON.stringify(r) + '\n').join(''));
  }
}
