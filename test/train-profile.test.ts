// `qalora train --profile`: the per-op breakdown covers the step (its rows add up to the step time the trainer
// measures), names the parts issue 10 asks for, and profiling changes neither the numbers nor the unprofiled path.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runTraining } from '../runtime/cli/train.ts';
import type { LlamaModel } from '../runtime/model/llama.ts';
import { GLUE, OpProfile, type ProfileReport } from '../runtime/model/profile.ts';
import type { Runner } from '../runtime/model/runner.ts';
import { resolveTrainConfig } from '../runtime/train/config.ts';
import { openForRun } from '../runtime/train/setup.ts';
import { fixture, repoRoot } from './fixtures.ts';
import { shakespeareSlice, STORIES, TOK } from './train-fixture.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-profile-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const data = shakespeareSlice(dir);
const STEPS = 4;

async function run(out: string, profile?: OpProfile, gradientCheckpointing = 'on') {
  const c = resolveTrainConfig({}, {
    model: fixture(STORIES), tokenizer: fixture(TOK), spec: join(repoRoot, 'specs/stories260k.qal'), data, out: join(dir, out),
    maxSteps: STEPS, seqLen: 64, batchSize: 4, evalEvery: 0, valFraction: 0, saveEvery: 0, quiet: true, seed: 3, gradientCheckpointing,
  });
  const lines: string[] = [];
  const s = await runTraining(c, (l) => lines.push(l), null, profile);
  return { s, text: lines.join('\n') };
}

describe('train --profile', () => {
  it('prints a breakdown whose rows add up to the step time, without changing the run', async () => {
    const profile = new OpProfile();
    const profiled = await run('profiled', profile);
    const plain = await run('plain');
    expect(profiled.s.result.losses).toEqual(plain.s.result.losses); // timing wrappers only: the same arithmetic

    const r: ProfileReport = JSON.parse(readFileSync(join(dir, 'profiled', 'profile.json'), 'utf8'));
    expect(r.steps).toBe(STEPS);
    const names = r.rows.map((x) => x.name);
    for (const want of ['q forward', 'down forward', 'q backward', 'down backward', 'attention forward', 'attention backward',
      'RMSNorm', 'RoPE', 'SwiGLU', 'classifier forward', 'classifier backward', 'cross-entropy', 'recompute', 'gradient clipping', 'AdamW', GLUE]) {
      expect(names).toContain(want);
    }
    const sum = r.rows.reduce((a, x) => a + x.msPerStep, 0);
    expect(Math.abs(sum - r.msPerStep)).toBeLessThan(1e-6 * r.msPerStep + 1e-9);
    expect(Math.abs(r.rows.reduce((a, x) => a + x.percent, 0) - 100)).toBeLessThan(1e-6);
    for (const x of r.rows) expect(x.msPerStep).toBeGreaterThanOrEqual(0);
    // The profiled window is the trainer's own step time (metrics.jsonl's elapsed) less a few statements.
    const metrics = readFileSync(join(dir, 'profiled', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const trainerMs = (1000 * metrics.filter((m) => m.kind === 'train').pop().elapsed) / STEPS;
    expect(r.msPerStep).toBeLessThanOrEqual(trainerMs);
    expect(r.msPerStep).toBeGreaterThan(0.95 * trainerMs);
    // The glue is the remainder, not most of the step: the timed ops cover where the work is.
    expect(r.rows.find((x) => x.name === GLUE)!.percent).toBeLessThan(50);

    expect(profiled.text).toMatch(new RegExp(`^profile: ${STEPS} steps, [\\d.]+ ms per step$`, 'm'));
    expect(profiled.text).toMatch(/^recompute\s+[\d.]+\s+[\d.]+%$/m);
    expect(profiled.text).toMatch(/^step\s+[\d.]+\s+100\.0%$/m);
    expect(plain.text).not.toMatch(/^profile:/m);

    // --gradient-checkpointing off keeps the forward's activations: no recompute row, the same losses.
    const kept = await run('kept', new OpProfile(), 'off');
    expect(kept.s.result.losses).toEqual(plain.s.result.losses);
    expect(kept.text).not.toMatch(/^recompute\s/m);
    expect(kept.text).toMatch(/^attention backward\s/m);
  }, 600_000);

  it('leaves an unprofiled model calling the native ops directly', async () => {
    const { model } = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: join(repoRoot, 'specs/stories260k.qal'), backend: 'cpu' });
    const runner = (model as unknown as { runner: Runner }).runner;
    expect(runner.core).toBe(runner.native.core);
    const linears = (runner as unknown as { linears: Array<Record<string, object>> }).linears;
    expect(Object.hasOwn(linears[0].q, 'forward')).toBe(false);
    expect(Object.hasOwn(runner, 'embed')).toBe(false);
    const profiled = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK), spec: join(repoRoot, 'specs/stories260k.qal'), backend: 'cpu', profile: new OpProfile() });
    const pr = (profiled.model as LlamaModel as unknown as { runner: Runner }).runner;
    expect(pr.core).not.toBe(pr.native.core);
  }, 600_000);
});
