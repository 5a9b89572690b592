// The fine-tuning loop: micro-batches → summed loss and gradients → mean over the step's targets → global-norm
// clipping → AdamW on the adapters. Periodic validation, metrics, plots and atomic checkpoints; a stop request
// (Ctrl-C) finishes the current step, saves, and returns. Resuming from a checkpoint replays the same data order
// and dropout seeds, so the loss sequence equals an uninterrupted run's. With `dist` (several MPI ranks) each
// rank trains on its share of every step's windows and the sums are added across ranks (distributed.ts).
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { AdapterInfo } from '../adapters/peft.ts';
import { savePeftAdapter } from '../adapters/peft.ts';
import { mixSeed, WindowSchedule, type PackedWindows } from '../data/dataset.ts';
import { QaloraError } from '../errors.ts';
import { Progress, sparkline } from '../progress.ts';
import { AdamW, ADAMW_DEFAULTS } from './adamw.ts';
import { BackendAdamW } from './backend-adamw.ts';
import type { F32 } from '../model/memory.ts';
import { hasCheckpoint, loadCheckpoint, saveCheckpoint, type TrainerState } from './checkpoint.ts';
import { SYNC_CHECK_EVERY, type DataParallel } from './distributed.ts';
import { evaluateWindows, type EvalResult, type TrainModel } from './evaluate.ts';
import { MetricsLog, type MetricRecord } from './metrics.ts';
import { alignedGrads, globalNorm, paramList } from './params.ts';
import { learningRate, type ScheduleName } from './schedule.ts';
import type { OpProfile } from '../model/profile.ts';

export interface TrainerOptions {
  model: TrainModel;
  train: PackedWindows;
  val: PackedWindows | null;
  outDir: string;
  adapterInfo: AdapterInfo;
  lr: number;
  schedule: ScheduleName;
  /** Steps when ≥ 1, fraction of totalSteps when < 1. */
  warmup: number;
  batchSize: number;
  gradAccum: number;
  totalSteps: number;
  evalEvery: number;
  evalWindows: number;
  saveEvery: number;
  seed: number;
  maxGradNorm: number;
  weightDecay: number;
  resume: boolean;
  /** Identifies the data and settings a resume must match (data cache key, seqLen, …). */
  fingerprint?: Record<string, string | number>;
  quiet?: boolean;
  /** Write the loss-curve plot (SVG + PNG) at checkpoints and the end. Default true. */
  plot?: boolean;
  /** Polled after every step: true stops the run (after saving). */
  shouldStop?: () => boolean;
  /** Called after each step (tests, the demo). */
  onStep?: (r: { step: number; loss: number; lr: number }) => void;
  /** Install a SIGINT handler that requests a stop. Default true. */
  handleSigint?: boolean;
  /** Print the final loss sparkline to stderr (default: unless quiet). */
  printSummary?: boolean;
  /** Data-parallel over MPI ranks: batchSize is per rank, a step takes batchSize·size windows. */
  dist?: DataParallel | null;
  /** The model's op profile (`train --profile`): steps are bracketed and clipping and AdamW timed into it. */
  profile?: OpProfile;
}

export interface TrainResult {
  startStep: number;
  steps: number;
  /** Mean train loss per step of this process's steps. */
  losses: number[];
  evals: { step: number; loss: number; perplexity: number }[];
  interrupted: boolean;
  adapterDir: string;
  checkpointDir: string;
  seconds: number;
  tokensPerSecond: number;
}

export function warmupSteps(warmup: number, totalSteps: number): number {
  return warmup >= 1 ? Math.round(warmup) : Math.ceil(warmup * totalSteps);
}

export async function train(o: TrainerOptions): Promise<TrainResult> {
  if (o.totalSteps < 1) throw new QaloraError(`nothing to train: ${o.totalSteps} steps`);
  mkdirSync(o.outDir, { recursive: true });
  const dp = o.dist ?? null;
  const root = !dp || dp.isRoot, ranks = dp?.size ?? 1;
  const params = paramList(o.model.adapters);
  if (params.length === 0) throw new QaloraError('the model has no adapters to train (every layer has rank 0)');
  const opt = new AdamW(params, { ...ADAMW_DEFAULTS, weightDecay: o.weightDecay });
  const checkpointDir = join(o.outDir, 'checkpoint');
  const adapterDir = join(o.outDir, 'adapter');
  const metrics = new MetricsLog(join(o.outDir, 'metrics.jsonl'));
  const fingerprint = {
    ...(o.fingerprint ?? {}), seed: o.seed, batchSize: o.batchSize, gradAccum: o.gradAccum,
    seqLen: o.train.seqLen, trainWindows: o.train.count, ranks,
  };

  let state: TrainerState = {
    version: 1, step: 0, position: 0, adamT: 0, seed: o.seed, tokensSeen: 0, elapsedSeconds: 0, fingerprint, totalSteps: o.totalSteps,
  };
  if (o.resume && root) {
    if (!hasCheckpoint(checkpointDir)) throw new QaloraError(`--resume: no checkpoint in ${checkpointDir}`);
    state = loadCheckpoint(checkpointDir, o.model.adapters, opt);
    for (const [k, v] of Object.entries(fingerprint)) {
      if (state.fingerprint[k] !== undefined && state.fingerprint[k] !== v) {
        throw new QaloraError(`--resume: ${k} was ${state.fingerprint[k]} in the checkpoint but is ${v} now; an exact continuation needs the same value`);
      }
    }
    metrics.truncateAfter(state.step);
  } else if (root) {
    metrics.truncateAfter(-1);
  }
  if (dp) state = dp.syncFromRoot(params, opt, state);

  const schedule = new WindowSchedule(o.train.count, o.seed);
  const warm = warmupSteps(o.warmup, o.totalSteps);
  const lrAt = (step: number) => learningRate(step, { name: o.schedule, lr: o.lr, warmupSteps: warm, totalSteps: o.totalSteps });
  const startStep = state.step;
  const losses: number[] = [];
  const evals: TrainResult['evals'] = [];
  const history = root ? metrics.read() : [];
  const progress = new Progress({ label: 'train', total: o.totalSteps, unit: 'steps', start: startStep, silent: o.quiet || !root });

  let stopRequested = false;
  const onSigint = () => {
    if (stopRequested) process.exit(130); // a second Ctrl-C does not wait
    stopRequested = true;
    progress.log('interrupted: finishing this step, saving a checkpoint (Ctrl-C again to quit without saving)');
  };
  if (o.handleSigint ?? true) process.on('SIGINT', onSigint);

  const prof = o.profile;
  const timed = <T>(row: string, fn: () => T): T => (prof ? prof.time(row, fn) : fn());
  const t0 = performance.now();
  let tokensThisRun = 0;
  const record = (r: MetricRecord) => {
    if (!root) return;
    metrics.append(r);
    history.push(r);
  };
  const runEval = (step: number): EvalResult | null => {
    if (!o.val || !root) return null;
    const r = evaluateWindows(o.model, o.val, o.batchSize, o.evalWindows);
    record({ kind: 'eval', step, valLoss: r.loss, valPerplexity: r.perplexity, valTokens: r.tokens });
    evals.push({ step, loss: r.loss, perplexity: r.perplexity });
    progress.log(`step ${step}: validation loss ${r.loss.toFixed(4)}, perplexity ${r.perplexity.toFixed(3)}`);
    return r;
  };
  // On a GPU backend the adapters, the gradients and the moments stay on the device: a step reads back its loss and
  // its gradient norm only, and the host arrays are brought up to date where files are written or ranks compared.
  const onBackend = o.model.trainingOnBackend?.();
  const backendOpt = onBackend ? new BackendAdamW(onBackend, opt) : undefined;
  const pull = () => {
    onBackend?.pull();
    backendOpt?.pull();
  };
  const save = () => {
    if (!root) return;
    pull();
    saveCheckpoint(checkpointDir, o.model.adapters, o.adapterInfo, opt, { ...state, adamT: opt.t });
    if (o.plot ?? true) void writePlots(o.outDir, history);
  };

  type MicroBatch = ReturnType<TrainerOptions['train']['batch']>;
  /** Runs fn on the step's micro-batches with counted targets (this rank's share); returns the positions seen. */
  const forEachMicro = (step: number, fn: (b: MicroBatch, seed: number) => void): number => {
    let positions = 0;
    for (let micro = 0; micro < o.gradAccum; micro++) {
      const idx = schedule.take(state.position + (dp?.rank ?? 0) * o.batchSize, o.batchSize);
      state.position += o.batchSize * ranks;
      const b = o.train.batch(idx);
      positions += b.batch * b.seqLen;
      if (b.count === 0) continue;
      fn(b, dp ? dp.dropoutSeed(mixSeed(o.seed, step, micro)) : mixSeed(o.seed, step, micro));
    }
    return positions;
  };
  type StepTotals = { sum: number; count: number; positions: number };
  /** The gradient of the step's mean loss, with clipping, is (grads sum)·clip/count: the factor AdamW takes. */
  const gradScale = (step: number, t: StepTotals, norm: number): number => {
    if (t.count === 0) throw new QaloraError(`step ${step}: no counted targets in the batch (is the whole data masked?)`);
    return (o.maxGradNorm > 0 && norm > o.maxGradNorm ? o.maxGradNorm / (norm + 1e-6) : 1) / t.count;
  };
  const hostStep = (step: number, lr: number): StepTotals & { norm: number } => {
    let sum = 0, count = 0;
    const acc = params.map((p) => new Float32Array(p.data.length));
    const positions = forEachMicro(step, (b, seed) => {
      const r = o.model.lossAndGrad(b.tokens, b.targets, b.batch, b.seqLen, { mask: b.mask, training: true, seed });
      sum += r.loss;
      count += r.count;
      const g = alignedGrads(params, r.grads);
      for (let k = 0; k < acc.length; k++) {
        const a = acc[k], gk = g[k];
        for (let i = 0; i < a.length; i++) a[i] += gk[i];
      }
    });
    const t = dp ? dp.reduceStep(acc, { sum, count, positions }) : { sum, count, positions };
    const norm = timed('gradient clipping', () => globalNorm(acc) / Math.max(t.count, 1));
    const scale = gradScale(step, t, norm);
    timed('AdamW', () => opt.step(acc, lr, scale));
    return { ...t, norm };
  };
  let accOnBackend: F32 | undefined;
  const backendStep = (step: number, lr: number): StepTotals & { norm: number } => {
    const on = onBackend!, { core, mem } = on;
    let sum = 0, count = 0, acc: F32 | undefined;
    const positions = forEachMicro(step, (b, seed) => {
      const r = on.lossAndGrad(b.tokens, b.targets, b.batch, b.seqLen, { mask: b.mask, training: true, seed });
      sum += r.loss;
      count += r.count;
      if (o.gradAccum === 1) acc = r.grads;
      else if (acc !== undefined) core.add_inplace(acc, r.grads, on.params.length);
      else mem.copy((acc = accOnBackend ??= mem.f32(on.params.length)), r.grads);
    });
    let t: StepTotals = { sum, count, positions };
    if (dp || acc === undefined) {
      // MPI reduces host arrays: the gradients go down, are summed over the ranks and come back up.
      const host = acc ? mem.read(acc, new Float32Array(on.params.length)) : new Float32Array(on.params.length);
      if (dp) t = dp.reduceStep([host], t);
      mem.write((acc = accOnBackend ??= mem.f32(on.params.length)), host);
    }
    const g = acc;
    const norm = timed('gradient clipping', () => Math.sqrt(core.sum_squares(g, on.params.length)) / Math.max(t.count, 1));
    const scale = gradScale(step, t, norm);
    timed('AdamW', () => backendOpt!.step(g, lr, scale));
    return { ...t, norm };
  };

  if (startStep === 0 && o.val && o.evalEvery > 0) runEval(0);
  let interrupted = false;
  try {
    for (let step = startStep + 1; step <= o.totalSteps; step++) {
      const stepStart = performance.now();
      prof?.beginStep();
      const lr = lrAt(step);
      const { sum, count, positions, norm } = onBackend ? backendStep(step, lr) : hostStep(step, lr);
      prof?.endStep();
      if (dp && step % SYNC_CHECK_EVERY === 0) {
        pull();
        dp.checkInSync(step, params, opt);
      }
      const loss = sum / count;
      if (!Number.isFinite(loss)) throw new QaloraError(`step ${step}: loss is ${loss}; lower the learning rate (now ${lr})`);
      const seconds = (performance.now() - stepStart) / 1000;
      state.step = step;
      state.tokensSeen += positions;
      state.elapsedSeconds += seconds;
      tokensThisRun += positions;
      losses.push(loss);
      const tps = tokensThisRun / ((performance.now() - t0) / 1000);
      record({
        kind: 'train', step, loss, lr, gradNorm: norm, tokens: state.tokensSeen, tokensPerSecond: tps,
        epoch: schedule.epochOf(Math.max(0, state.position - 1)), elapsed: state.elapsedSeconds,
      });
      progress.update(step, { loss, lr, 'tok/s': Math.round(tps) });
      o.onStep?.({ step, loss, lr });
      if (o.val && o.evalEvery > 0 && step % o.evalEvery === 0 && step !== o.totalSteps) runEval(step);
      if (o.saveEvery > 0 && step % o.saveEvery === 0 && step !== o.totalSteps) save();
      // Let signal handlers run between steps.
      await new Promise((r) => setImmediate(r));
      const stop = stopRequested || !!o.shouldStop?.();
      if (dp ? dp.any(stop) : stop) {
        interrupted = step < o.totalSteps;
        break;
      }
    }
    if (!interrupted && o.val && state.step === o.totalSteps && (evals.length === 0 || evals[evals.length - 1].step !== state.step)) runEval(state.step);
    save();
    if (!interrupted && root) savePeftAdapter(adapterDir, o.model.adapters, o.adapterInfo);
  } finally {
    onBackend?.end();
    progress.stop();
    if (o.handleSigint ?? true) process.off('SIGINT', onSigint);
  }
  if ((o.plot ?? true) && root) await writePlots(o.outDir, history);
  const seconds = (performance.now() - t0) / 1000;
  if ((o.printSummary ?? !o.quiet) && root) {
    const all = history.filter((r) => r.kind === 'train').map((r) => (r as { loss: number }).loss);
    if (all.length > 1) process.stderr.write(`loss ${all[0].toFixed(3)} ${sparkline(all)} ${all[all.length - 1].toFixed(3)}\n`);
    if (interrupted) process.stderr.write(`stopped at step ${state.step}; resume with --resume (checkpoint: ${checkpointDir})\n`);
  }
  return {
    startStep, steps: state.step, losses, evals, interrupted, adapterDir, checkpointDir, seconds,
    tokensPerSecond: seconds > 0 ? tokensThisRun / seconds : 0,
  };
}

async function writePlots(outDir: string, history: MetricRecord[]): Promise<void> {
  try {
    const { writeLossPlots } = await import('../plot/loss-curve.ts');
    await writeLossPlots(outDir, history);
  } catch (e) {
    process.stderr.write(`warning: could not write the loss plot: ${(e as Error).message}\n`);
  }
}
