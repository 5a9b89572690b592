// Where a training step's (or a decoded token's) time goes, per op (`qalora train --profile`, `qalora generate
// --profile`, bench/train.ts). The runner installs it
// only when asked — wrapping its core-ops table, its linear layers and its recompute — so an unprofiled run calls
// the native ops directly. Time is counted once, by the outermost timed section: a projection's forward includes
// its fp16 casts, and everything the per-block recompute runs in backward is "recompute". Only the time between
// beginStep and endStep counts (validation between steps does not); what no section claims is "JS glue".
import type { CoreOps } from './native-ops.ts';

/** Core op → row; ops not listed (casts, residual adds) fall to their own names. */
const CORE_ROWS: Partial<Record<keyof CoreOps, string>> = {
  gemm: 'float GEMM',
  embedding_forward: 'embedding', embedding_backward: 'embedding',
  rmsnorm_forward: 'RMSNorm', rmsnorm_backward: 'RMSNorm',
  rope_forward: 'RoPE', rope_backward: 'RoPE',
  attention_forward: 'attention forward', attention_backward: 'attention backward',
  swiglu_forward: 'SwiGLU', swiglu_backward: 'SwiGLU',
  cross_entropy_forward: 'cross-entropy', cross_entropy_backward: 'cross-entropy',
  add_inplace: 'residual adds',
};

/** The order rows print in (the step's own order, roughly); unknown rows go after these, glue last. */
const ORDER = [
  'embedding', 'RMSNorm',
  ...['q', 'k', 'v', 'o', 'gate', 'up', 'down'].map((p) => `${p} forward`),
  'RoPE', 'attention forward', 'SwiGLU', 'residual adds', 'classifier forward', 'cross-entropy', 'classifier backward',
  'recompute',
  ...['q', 'k', 'v', 'o', 'gate', 'up', 'down'].map((p) => `${p} backward`),
  'attention backward', 'float GEMM', 'gradient clipping', 'AdamW',
];
export const GLUE = 'JS glue';

export interface ProfileRow { name: string; msPerStep: number; percent: number }
export interface ProfileReport { steps: number; msPerStep: number; rows: ProfileRow[] }

/** Anything with forward/backward methods (LinearOp): timed per projection kind. */
interface TwoWay {
  forward(...a: never[]): void;
  backward(...a: never[]): void;
}

export class OpProfile {
  private readonly ms = new Map<string, number>();
  private depth = 0;
  private armed = false;
  private stepStart = 0;
  private steps = 0;
  private stepMs = 0;

  beginStep(): void {
    this.armed = true;
    this.stepStart = performance.now();
  }

  endStep(): void {
    this.stepMs += performance.now() - this.stepStart;
    this.steps++;
    this.armed = false;
  }

  /** fn(), its time added to `row` unless an enclosing section already counts it. */
  time<T>(row: string, fn: () => T): T {
    if (!this.armed || this.depth > 0) return fn();
    this.depth++;
    const t0 = performance.now();
    try {
      return fn();
    } finally {
      this.depth--;
      this.ms.set(row, (this.ms.get(row) ?? 0) + performance.now() - t0);
    }
  }

  wrap<A extends unknown[], R>(row: string, fn: (...a: A) => R): (...a: A) => R {
    return (...a: A) => this.time(row, () => fn(...a));
  }

  /** The same table with every op timed. */
  wrapCore(core: CoreOps): CoreOps {
    const out = { ...core } as Record<string, unknown>;
    for (const [name, fn] of Object.entries(core)) {
      if (typeof fn === 'function') out[name] = this.wrap(CORE_ROWS[name as keyof CoreOps] ?? name, fn.bind(core) as (...a: unknown[]) => unknown);
    }
    return out as unknown as CoreOps;
  }

  /** Times op's forward and backward as `${kind} forward` / `${kind} backward` (own properties over the class's). */
  timeLinear(op: TwoWay, kind: string): void {
    op.forward = this.wrap(`${kind} forward`, op.forward.bind(op));
    op.backward = this.wrap(`${kind} backward`, op.backward.bind(op));
  }

  report(): ProfileReport {
    const n = Math.max(1, this.steps), step = this.stepMs / n;
    const names = [...ORDER.filter((r) => this.ms.has(r)), ...[...this.ms.keys()].filter((r) => !ORDER.includes(r))];
    const rows = names.map((name) => ({ name, msPerStep: this.ms.get(name)! / n }));
    const timed = rows.reduce((s, r) => s + r.msPerStep, 0);
    rows.push({ name: GLUE, msPerStep: Math.max(0, step - timed) });
    return { steps: this.steps, msPerStep: step, rows: rows.map((r) => ({ ...r, percent: step > 0 ? (100 * r.msPerStep) / step : 0 })) };
  }

  /** The report as an aligned text table (ms per step, % of the step); `unit` names a step ('token' for decode). */
  table(unit = 'step'): string {
    const r = this.report();
    const w = Math.max(...r.rows.map((x) => x.name.length), 4);
    const line = (name: string, ms: number, pct: number) => `${name.padEnd(w)}  ${ms.toFixed(2).padStart(10)}  ${pct.toFixed(1).padStart(5)}%`;
    return [
      `profile: ${r.steps} ${unit}${r.steps === 1 ? '' : 's'}, ${r.msPerStep.toFixed(1)} ms per ${unit}`,
      `${'op'.padEnd(w)}  ${`ms/${unit}`.padStart(10)}  ${'share'.padStart(6)}`,
      ...r.rows.map((x) => line(x.name, x.msPerStep, x.percent)),
      line(unit, r.msPerStep, 100),
    ].join('\n');
  }
}
